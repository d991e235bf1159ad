"""Can standard regularisation keep LeMoLE's dynamic (timestamp) prompts from overfitting ETTh1?

RESULTS.md: LeMoLE with its per-step timestamp prompts reaches 0.446 test MSE on ETTh1 (H=96) against
0.376 without them; training MSE falls while validation MSE rises from the first epoch. This script
trains the same model through ``mmts-fast train`` with ONE change to the dynamic branch:

- ``dropout:P``   dropout P on ``Linear(d_llm -> 2C)(Z_D)`` (training only);
- ``pca:K``       the timestamp embeddings replaced by their rank-K reconstruction around the mean of the
                  training rows (the projection can then only read the K leading directions);
- ``no-year``     prompts without the year ("This is Time Series from 07-01 00:00 to 07-01 01:00");
- ``lr-scale:S``  the dynamic branch's effective Adam learning rate scaled by S (its weights are
                  parameterised as ``S * W'``; Adam's step is invariant to the gradient's scale);
- ``plain-gamma`` the public code's FiLM: gamma = ``Linear(...)`` itself, not ``1 + Linear(...)``, in both
                  FiLMs (with our near-zero init, each FiLM branch then starts near beta, not near Y);
- ``span:N``      each step's prompt spans N steps ("from {t} to {t + (N-1) step}"), our reading of the
                  public code's ``preprocess_dynamic.py`` with N = the lookback (ours: N = 2, one step).

Variants combine with ``+`` (``plain-gamma+span:512``).

Usage (one run; the other arguments go to ``mmts-fast train``):

    MMTS_FAST_CACHE=DIR python bench/ablate_lemole_dynamic.py pca:8 --data ETTh1.csv --lookback 512 \\
        --horizon 96 --seed 2021 --out runs/lemole_dynamic_ablation/pca8_s2021

then ``python bench/summarize_runs.py runs/lemole_dynamic_ablation``. A study script, not a package
option: none of these variants beats the model without text on validation MSE (RESULTS.md).
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

VARIANTS = ("dropout:P", "pca:K", "no-year", "lr-scale:S", "plain-gamma", "span:N")


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


def _plain_gamma():
    """gamma = the Linear's output (the identity FiLM's 1 taken off the gamma half of both FiLMs)."""
    dynamic_film = LeMoLE._dynamic_film

    def patched(self, B, L, dtype, emb, table, index):
        gb = dynamic_film(self, B, L, dtype, emb, table, index)                       # [B, 2C, H]
        C = self.config.channels
        return torch.cat([gb[:, :C] - 1, gb[:, C:]], dim=1)
    LeMoLE._dynamic_film = patched

    def static(m):
        if not m.config.use_static:
            return
        CH = m.config.channels * m.config.horizon
        shift = torch.cat([torch.ones(CH), torch.zeros(CH)])                    # view(-1, 2C, H): gamma first
        m.static_film.register_forward_hook(lambda mod, inp, out: out - shift.to(out))
    _after_init(static)


def _span(n: int):
    """Each step's prompt ends n - 1 steps after it."""
    dynamic_prompts = prompts.dynamic_prompts

    def patched(dates, freq=None):
        dates = prompts._as_datetimes(dates)
        step = prompts._infer_step(dates) if freq is None else prompts.freq_step(freq)
        one = dynamic_prompts(dates, step)
        ends = dynamic_prompts(dates, step * (n - 1))
        return [a.rsplit(" to ", 1)[0] + " to " + b.rsplit(" to ", 1)[1] for a, b in zip(one, ends)]
    conditioning.dynamic_prompts = patched


def apply(variant: str) -> None:
    if "+" in variant:
        for v in variant.split("+"):
            apply(v)
        return
    name, _, value = variant.partition(":")
    if name == "plain-gamma":
        _plain_gamma()
        return
    if name == "span":
        _span(int(value))
        return
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
