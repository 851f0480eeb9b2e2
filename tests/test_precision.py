"""train.precision's rule (unpaired.devices.precision_rule) for every kind of card, on the CPU: it is a
pure function of (device type, compute capability, setting), so no GPU is needed to check it."""

import pytest
import torch

from unpaired import devices

CARDS = {
    "P100": (6, 0),
    "V100": (7, 0),
    "T4": (7, 5),
    "A100": (8, 0),
    "RTX 3090": (8, 6),
    "L4": (8, 9),
    "H100": (9, 0),
    "B200": (10, 0),
}


@pytest.mark.parametrize("card", CARDS)
def test_auto_is_bf16_only_where_the_card_computes_it_natively(card):
    """is_bf16_supported() says yes on a T4 or V100 (emulation); auto must not take that as native."""
    cap = CARDS[card]
    choice = devices.precision_rule("cuda", cap, "auto")
    assert choice.bf16 == (cap >= (8, 0))
    assert choice.warning is None
    assert f"compute capability {cap[0]}.{cap[1]}" in choice.why
    if choice.bf16:
        assert choice.why.startswith("precision: bf16 autocast: train.precision auto on CUDA")
    else:
        assert choice.why.startswith("precision: fp32: train.precision auto on CUDA")
        assert "has no native bf16 (native bf16 from 8.0" in choice.why


@pytest.mark.parametrize("card", CARDS)
def test_explicit_bf16_is_kept_and_warns_on_an_older_card(card):
    cap = CARDS[card]
    choice = devices.precision_rule("cuda", cap, "bf16")
    assert choice.bf16
    if cap >= (8, 0):
        assert choice.warning is None and "emulated" not in choice.why
    else:
        assert choice.warning == (
            f"warning: params.yaml: train.precision: bf16 on CUDA compute capability {cap[0]}.{cap[1]}, which "
            f"has no native bf16 (native bf16 from 8.0): torch emulates it, slower than fp32; use auto or fp32"
        )
        assert choice.why.endswith("(emulated)")


@pytest.mark.parametrize("card", CARDS)
def test_fp32_is_fp32_with_tf32_only_where_the_card_has_it(card):
    cap = CARDS[card]
    choice = devices.precision_rule("cuda", cap, "fp32")
    assert not choice.bf16 and choice.warning is None
    assert ("TF32" in choice.why) == (cap >= (8, 0))


def test_unknown_capability_cpu_and_mps():
    assert not devices.precision_rule("cuda", None, "auto").bf16
    assert devices.precision_rule("cuda", None, "bf16").warning is not None
    for native in (True, False, None):
        assert not devices.precision_rule("cpu", None, "auto", native).bf16
        choice = devices.precision_rule("cpu", None, "bf16", native)
        assert choice.bf16 and (choice.warning is not None) == (native is False)
    assert devices.precision_rule("cpu", None, "auto").why == (
        "precision: fp32: train.precision auto on CPU: bf16 only on CUDA cards with native bf16, never on a CPU"
    )
    assert (
        not devices.precision_rule("mps", None, "auto").bf16
        and devices.precision_rule("mps", None, "bf16").bf16
    )
    assert (
        "evaluate.precision"
        in devices.precision_rule("cuda", (7, 5), "bf16", key="evaluate.precision").warning
    )


def test_this_machine_follows_the_rule():
    """precision_for / bf16_for / precision_warning on this machine's CPU (and on its CUDA card, if any)."""
    cpu = torch.device("cpu")
    assert devices.precision_for(cpu, "auto") == devices.precision_rule("cpu", None, "auto")
    assert devices.precision_for(cpu, "bf16") == devices.precision_rule(
        "cpu", None, "bf16", devices.cpu_bf16_native()
    )
    assert devices.bf16_for(cpu, "bf16") and not devices.bf16_for(cpu, "auto")
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        cap = torch.cuda.get_device_capability(cuda)
        assert devices.bf16_for(cuda, "auto") == (cap >= (8, 0))
        assert (devices.precision_warning(cuda, "bf16") is None) == (cap >= (8, 0))
