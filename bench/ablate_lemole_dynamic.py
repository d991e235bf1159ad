"""Can standard regularisation keep LeMoLE's dynamic (timestamp) prompts from overfitting ETTh1?

RESULTS.md: LeMoLE with its per-step timestamp prompts reaches 0.446 test MSE on ETTh1 (H=96) against
0.376 without them; training MSE falls while validation MSE rises from the first epoch. This script
trains the same model through ``mmts-fast train`` with ONE change to the dynamic branch:

- ``dropout:P``   dropout P on ``Linear(d_llm -> 2C)(Z_D)`` (training only);
- ``pca:K``       the timestamp embeddings replaced by their rank-K reconstruction around the mean of the
                  training rows (the projection can then only read the K leading directions);
- ``no-year``     prompts without the year ("This is Time Series from 07-01 00:00 to 07-01 01:00");
- ``lr-scale:S``  the dynamic branch's effective Adam learning rate scaled by S (its weights are
                  parameterised as ``S * W'``; Adam's step is invariant to the gradient's scale).

Usage (one run; the other arguments go to ``mmts-fast train``):

    MMTS_FAST_CACHE=DIR python bench/ablate_lemole_dynamic.py pca:8 --data ETTh1.csv --lookback 512 \\
        --horizon 96 --seed 2021 --out runs/lemole_dynamic_ablation/pca8_s2021

then ``python bench/summarize_runs.py runs/lemole_dynamic_ablation``. A study script, not a package
option: none of these variants beat the model without text (RESULTS.md).
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.utils import parametrize

import mmts_fast.text.conditioning as conditioning
import mmts_fast.text.prompts as prompts
from mmts_fast.cli import main as cli_main
from mmts_fast.models.lemole import LeMoLE

VARIANTS = ("dropout:P", "pca:K", "no-year", "lr-scale:S")


def _after_init(extra):
    """Runs ``extra(model)`` at the end of every LeMoLE.__init__."""
    init = LeMoLE.__init__

    def patched(self, config):
        init(self, config)
        if config.use_dynamic:
            extra(self)
    LeMoLE.__init__ = patched


class _Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, w):
        return w * self.s

    def right_inverse(self, w):   # the initial values are kept: W' = W / S
        return w / self.s


def _low_rank(k: int):
    """Replaces the dynamic-prompt table by mean + its projection on the K leading principal directions
    of the rows the training split reads."""
    extras = conditioning._lemole_extras
    done = {}

    def patched(split, static, dyn, r0):
        if "table" not in done:
            tr0, tr1 = split.borders[0]                    # the training split's rows
            rows = dyn[max(tr0 - r0, 0):tr1 - r0].double()
            mean = rows.mean(0)
            basis = torch.linalg.svd(rows - mean, full_matrices=False)[2][:k].T          # [d, K]
            done["table"] = (mean + (dyn.double() - mean) @ basis @ basis.T).float()
            err = float((done["table"] - dyn).norm() / dyn.norm())
            print(f"pca:{k}: rank-{k} table, relative Frobenius change {err:.3f}")
        return extras(split, static, done["table"], r0)
    conditioning._lemole_extras = patched


def apply(variant: str) -> None:
    name, _, value = variant.partition(":")
    if name == "dropout":
        _after_init(lambda m: setattr(m, "dynamic_proj", nn.Sequential(m.dynamic_proj, nn.Dropout(float(value)))))
    elif name == "pca":
        _low_rank(int(value))
    elif name == "no-year":
        prompts.DATE_FORMAT = "%m-%d %H:%M"
    elif name == "lr-scale":
        def scale(m):
            for lin in (m.dynamic_proj, m.dynamic_time):
                for p in ("weight", "bias"):
                    parametrize.register_parametrization(lin, p, _Scale(float(value)))
        _after_init(scale)
    else:
        raise SystemExit(f"error: unknown variant {variant!r}; one of {', '.join(VARIANTS)}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    apply(argv[0])
    return cli_main(["train", "--model", "lemole", *argv[1:]])


if __name__ == "__main__":
    main()
