"""`web` source: images found by keyword on an image search engine.

    source: web
    engine: bing                  # bing (default, through icrawler) or google (google-images-download)
    keywords: [red fox, fox in snow]
    count: 200                    # in all, shared evenly between the keywords
    min_size: 128                 # optional: skip images whose shorter side is smaller

The packages contribute what they know about each engine: the result-page URLs (query, paging) and
the parsing of those pages into image URLs. Fetching the pages and the images is ours: images are
downloaded in parallel but taken in rank order, so the same server answers give the same files
(icrawler's crawler threads would reorder them); every image is decoded in full before
it is kept (non-images, truncated files, failed downloads and duplicates by content are skipped and
counted in a printed summary); files are named `<rank:05d>_<sha12>.<ext>` (rank in the engine's
results; prefixed with the keyword when there are several), with the image's URL as its manifest
origin. Nothing downloaded is ever executed: pages are parsed as text, images decoded by Pillow.

Everything goes through `<cache>/web/`: result pages per engine and keyword, images by URL, and what
each URL gave (`urls.json`, failures included), so a re-run with the same or a smaller `count` makes
no request at all and gives the same images even though the engine's results drift. Delete that
folder to search afresh and to retry the URLs that failed.

Images found this way belong to their owners: `licence` defaults to a warning, not a licence.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from time import sleep
from typing import Any, Literal
from urllib.parse import quote_plus, urlsplit, urlunsplit

import requests
from PIL import Image

from unpaired.files import atomic_write_bytes, atomic_write_json
from unpaired.images import Skip, decode
from unpaired.params import TIMEOUT, Bound, Params, check, parse
from unpaired.sources.base import FetchContext, SourceError
from unpaired.sources.download import RETRY_STATUS, download

BING_MAX_RESULTS = 1000  # Bing serves nothing past the 1000th result (icrawler's limit too)
PAGE_TRIES = 3
IMAGE_RETRIES = 1  # images are many and replaceable: one retry, then the next result
DOWNLOAD_THREADS = 8
FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
# The search engines answer browsers; these are the headers icrawler's own session sends.
BROWSER_HEADERS = {
    "Accept-Language": "en-US,en;q=0.8",
    "User-Agent": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/88.0.4324.104 Safari/537.36"
    ),
}


@dataclass(frozen=True)
class WebParams(Params):
    keywords: str | list[str] = ""  # required: a search phrase or a list of them
    #: bing (icrawler) or google (google-images-download; Google's page changes often break it)
    engine: Literal["bing", "google"] = "bing"
    count: int = 100  # images in all, shared between the keywords
    min_size: int | None = None  # skip images whose shorter side is smaller (pixels)
    timeout: float = 30.0  # seconds per request
    licence: str = "unknown: check each origin URL before use"  # recorded in the manifest
    base_url: str = ""  # replaces the engine's scheme://host/path (a mirror, or a test server)

    @property
    def keyword_list(self) -> list[str]:
        return [self.keywords] if isinstance(self.keywords, str) else list(self.keywords)

    BOUNDS = {
        "count": Bound(10_000, "search engines offer a few hundred results per phrase"),
        "min_size": Bound(
            65_535, "pixels; no format this reads stores a longer side (JPEG's limit)"
        ),
        "timeout": TIMEOUT,
    }

    def validate(self, prefix: str) -> None:
        words = self.keyword_list
        check(
            bool(words) and all(w.strip() for w in words),
            f"{prefix}.keywords",
            "required: a search phrase, or a list of them",
        )
        check(len(set(words)) == len(words), f"{prefix}.keywords", "has the same phrase twice")
        check(self.count > 0, f"{prefix}.count", f"must be > 0, got {self.count}")
        check(
            self.min_size is None or self.min_size > 0,
            f"{prefix}.min_size",
            f"must be > 0, got {self.min_size}",
        )
        check(self.timeout > 0, f"{prefix}.timeout", f"must be > 0, got {self.timeout}")
        check(
            self.base_url == "" or self.base_url.startswith(("http://", "https://")),
            f"{prefix}.base_url",
            "must be an http(s) URL",
        )


# --- the engines: result-page URLs and page parsing, from the packages -----------------------------


def bing_pages(keyword: str) -> list[str]:
    """icrawler's BingFeeder builds the page URLs. We call its feed() directly rather than running
    BingImageCrawler: the crawler's threads reorder results, its parser threads log and swallow HTTP
    errors (a dead engine would look like "no results"), and its downloader keeps any bytes."""
    from icrawler.builtin.bing import BingFeeder
    from icrawler.utils import Signal

    feeder = BingFeeder(1, Signal(), None)
    feeder.out_queue = queue.Queue()  # unbounded: nothing consumes it while feed() runs
    feeder.feed(
        keyword=quote_plus(keyword), offset=0, max_num=BING_MAX_RESULTS
    )  # it does not quote
    return list(feeder.out_queue.queue)


def bing_images(page: bytes) -> list[str | None]:
    """The full image URL (`murl` of the JSON in the `m` attribute) of every result on a page, in
    rank order; None for a result that has none. Hand-written rather than icrawler's BingParser: that
    one matches `murl":"(.*?)\\.jpg` with a regular expression, so it drops every .png, .jpeg, .JPG,
    .webp or extension-less result, and runs on into the next field when a URL has no `.jpg`."""
    from bs4 import BeautifulSoup

    urls: list[str | None] = []
    for div in BeautifulSoup(page.decode("utf-8", "ignore"), "html.parser").find_all(
        "div", class_="imgpt"
    ):
        link = div.find("a", attrs={"m": True})
        if link is None:
            continue
        try:
            murl = json.loads(link["m"]).get("murl")  # the parser already unescaped the attribute
        except (ValueError, AttributeError):
            murl = None
        urls.append(murl if isinstance(murl, str) and murl else None)
    return urls


def google_pages(keyword: str) -> list[str]:
    """google-images-download builds the search URL; there is one page (it scrolls for more in a
    browser). Its own fetch drives a headless Chrome, which runs Google's JavaScript: we fetch the
    page as plain HTML instead, so nothing downloaded is executed."""
    from google_images_download.google_images_download import args_list, googleimagesdownload

    gid = googleimagesdownload()
    filters = gid.build_url_parameters(dict.fromkeys(args_list))
    return [gid.build_search_url(keyword, filters, None, None, None, None)]


def google_images(page: bytes) -> list[str]:
    """google-images-download's item parser, walked over the page as its _get_all_items does
    (https image URLs only)."""
    from google_images_download.google_images_download import googleimagesdownload

    gid, text, urls = googleimagesdownload(), page.decode("utf-8", "ignore"), []
    while True:
        item, end = gid._get_next_item(text)
        if item == "no_links":
            return urls
        urls.append(item["ou"])
        text = text[end:]


@dataclass(frozen=True)
class Engine:
    url: str  # the real scheme://host/path of its result pages
    pages: Callable[[str], list[str]]  # keyword -> result-page URLs, in order
    images: Callable[[bytes], list[str | None]]  # result page -> image URLs in rank order (None:
    # a result without one)


ENGINES = {
    "bing": Engine("https://www.bing.com/images/async", bing_pages, bing_images),
    "google": Engine("https://www.google.com/search", google_pages, google_images),
}


def rebase(url: str, base: str) -> str:
    """`url` with the scheme, host and path of `base`, its query kept."""
    b = urlsplit(base)
    return urlunsplit((b.scheme, b.netloc, b.path, urlsplit(url).query, ""))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "keyword"


# --- fetching ------------------------------------------------------------------------------------


def search_page(url: str, dest: Path, key: str, engine: str, timeout: float) -> bytes:
    """One result page, from the cache or the engine (with browser headers, unlike download())."""
    if dest.is_file():
        return dest.read_bytes()
    last = ""
    for attempt in range(PAGE_TRIES):
        if attempt:
            sleep(2.0**attempt)
        try:
            r = requests.get(url, headers=BROWSER_HEADERS, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as err:
            last = type(err).__name__
            continue
        except requests.RequestException as err:
            last = type(err).__name__
            break
        if r.status_code == 200:
            atomic_write_bytes(dest, r.content)
            return r.content
        last = f"HTTP {r.status_code}"
        if r.status_code not in RETRY_STATUS:
            break
    raise SourceError(
        f"{key}: the {engine} image search is unreachable or refused ({last} for {url}); "
        f"check the network, try again later, or try the other engine"
    )


def results(
    p: WebParams, keyword: str, ctx: FetchContext, offered: Counter | None = None
) -> Iterator[tuple[int, str]]:
    """(rank, image URL) for `keyword` in the engine's order, each URL once; fetches pages lazily.
    `offered` counts the results on the pages read ("results") and those without an image URL
    ("no_image_url")."""
    offered = Counter() if offered is None else offered
    engine = ENGINES[p.engine]
    search_id = hashlib.sha256(f"{p.base_url} {keyword}".encode()).hexdigest()[:10]
    folder = ctx.cache_dir / "web" / p.engine / f"{slug(keyword)}-{search_id}"
    seen: dict[str, None] = {}
    for i, url in enumerate(engine.pages(keyword)):
        url = rebase(url, p.base_url or engine.url)
        cached = folder / f"page-{i:03d}.html"
        found = engine.images(search_page(url, cached, f"{ctx.key}.engine", p.engine, p.timeout))
        offered["results"] += len(found)
        offered["no_image_url"] += found.count(None)
        new = [u for u in dict.fromkeys(found) if u is not None and u not in seen]
        if not new:
            cached.unlink()  # the end of the results, or a captcha: ask again next time
            if i == 0:
                raise SourceError(
                    f"{ctx.key}.keywords: {p.engine} returned no image results for {keyword!r} "
                    f"({url}); check the phrase, or the engine's page format changed: "
                    f"try the other engine"
                )
            return
        for u in new:
            yield len(seen), u
            seen[u] = None


def plain_url(url: str) -> bool:
    """The page parsers are regular expressions; a match that ran across JSON fields is dropped."""
    parts = urlsplit(url)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.netloc)
        and not re.search(r'[\s"\\<>]', url)
    )


class Cache:
    """Images by URL, and what each URL gave (`urls.json`), under <cache_dir>/web/."""

    def __init__(self, root: Path):
        self.root, self.index = root, root / "urls.json"
        self.outcomes: dict[str, dict[str, Any]] = (
            json.loads(self.index.read_text()) if self.index.is_file() else {}
        )

    def image(self, url: str) -> Path:
        return self.root / "images" / hashlib.sha256(url.encode()).hexdigest()[:32]

    def outcome(self, url: str, key: str, timeout: float) -> dict[str, Any]:
        """{"skip": reason} or {"sha256", "ext", "width", "height"}; downloads only what is unknown."""
        known = self.outcomes.get(url)
        if known is None or ("skip" not in known and not self.image(url).is_file()):
            known = self.outcomes[url] = self.check(url, key, timeout)
        return known

    def check(self, url: str, key: str, timeout: float) -> dict[str, Any]:
        if not plain_url(url):
            return {"skip": "bad_url"}
        path = self.image(url)
        try:
            download(url, path, key=key, timeout=timeout, retries=IMAGE_RETRIES, backoff=0.5)
        except SourceError:
            return {"skip": "download_failed"}
        data = path.read_bytes()
        try:
            img = decode(data, url)
            ext = FORMATS.get(Image.open(io.BytesIO(data)).format or "")
            if ext is None:
                raise Skip("not_image", url)
        except Skip as skip:
            path.unlink()
            return {"skip": skip.reason}
        except Exception:  # noqa: BLE001 - a decoder failure on one strange file: skip it, keep going
            path.unlink()
            return {"skip": "error"}
        return {
            "sha256": hashlib.sha256(data).hexdigest(),
            "ext": ext,
            "width": img.width,
            "height": img.height,
        }

    def save(self) -> None:
        atomic_write_json(self.index, self.outcomes)


# --- the source ----------------------------------------------------------------------------------


def collect(
    p: WebParams,
    keyword: str,
    prefix: str,
    quota: int,
    ctx: FetchContext,
    cache: Cache,
    hashes: set[str],
    skips: Counter,
    offered: Counter | None = None,
) -> list[dict[str, Any]]:
    """Up to `quota` new images for `keyword`, in rank order, written into ctx.out_dir."""
    found = results(p, keyword, ctx, offered)
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        # Ask for as many results as are still missing: each gives at most one image, so nothing is
        # downloaded (or paged) beyond need, and the decisions below follow rank order.
        while len(rows) < quota and (batch := list(islice(found, quota - len(rows)))):
            outcomes = pool.map(
                lambda r: cache.outcome(r[1], f"{ctx.key}.keywords", p.timeout), batch
            )
            for (rank, url), got in zip(batch, outcomes):
                if "skip" in got:
                    skips[got["skip"]] += 1
                elif p.min_size is not None and min(got["width"], got["height"]) < p.min_size:
                    skips["too_small"] += 1
                elif got["sha256"] in hashes:
                    skips["duplicate"] += 1
                else:
                    hashes.add(got["sha256"])
                    name = f"{prefix}{rank:05d}_{got['sha256'][:12]}.{got['ext']}"
                    shutil.copyfile(cache.image(url), ctx.out_dir / name)
                    rows.append(
                        {"file": name, "source": "web", "origin": url, "licence": p.licence}
                    )
    return rows


def fetch(raw: dict[str, Any], ctx: FetchContext) -> list[dict[str, Any]]:
    p = parse(WebParams, raw, ctx.key)
    words = p.keyword_list
    cache = Cache(ctx.cache_dir / "web")
    rows: list[dict[str, Any]] = []
    hashes: set[str] = set()
    skips: Counter = Counter()
    offered: Counter = Counter()
    for i, word in enumerate(words):
        quota = -(
            -(p.count - len(rows)) // (len(words) - i)
        )  # an even share of what is left, rounded up
        if quota > 0:
            rows += collect(
                p,
                word,
                f"{slug(word)}_" if len(words) > 1 else "",
                quota,
                ctx,
                cache,
                hashes,
                skips,
                offered,
            )
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(skips.items())) or "none"
    if not rows:
        raise SourceError(
            f"{ctx.key}.keywords: none of the {p.engine} results could be used (skipped: {skipped}); "
            f"try other keywords" + (" or a smaller min_size" if p.min_size else "")
        )
    cache.save()  # only after a run that got images: a failed run (network down) leaves no verdicts
    short = f"; only {len(rows)} of {p.count}: the results ran out" if len(rows) < p.count else ""
    print(
        f"web: {len(rows)} images from {p.engine} for {', '.join(map(repr, words))}; the result pages read "
        f"offered {offered['results']} results ({offered['no_image_url']} without an image URL), "
        f"{len(rows)} kept; skipped: {skipped}{short}"
    )
    return rows
