"""Command line: ``mmts-fast train | eval | export | run``.

    mmts-fast train --model rlinear_mole --data ETTh1.csv --lookback 336 --horizon 96 --seed 2021 --out DIR
    mmts-fast eval DIR [--data CSV]             # MSE/MAE on the test split and DIR/forecast.png
    mmts-fast export DIR [--out model.onnx] [--data CSV]   # ONNX, checked in ONNX Runtime
    mmts-fast run [--data CSV] --out DIR        # train, eval and export in one go (built-in data by default)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

DATA_SPEC = "data.json"
# What a run folder holds (train, eval, export); --overwrite removes these names and nothing else.
RUN_FILES = ("config.json", "model.safetensors", "metrics.json", DATA_SPEC, "forecast.png", "model.onnx",
             "model.onnx.data")
TEXT_MODELS = ("lemole", "mome", "llm_ts_net")
WINDOW_MODELS = ("dlinear_mole", "rlinear_mole", "rmlp_mole", "lemole", "mola")
# Per-model training defaults that differ from MoLE's recipe (TrainConfig's defaults).
MODEL_RECIPES = {"mome": dict(optimizer="adamw", lr=1e-3, grad_clip=1.0),
                 "llm_ts_net": dict(optimizer="adamw", lr=1e-3, grad_clip=1.0)}


# ------------------------------------------------------------------------------------------- data
def is_timemmd(path: Path) -> bool:
    """A Time-MMD domain: a folder, or a CSV with a ``<stem>_report.csv`` beside it."""
    return path.is_dir() or (path.parent / f"{path.stem}_report.csv").exists()


def build_datasets(spec: dict):
    """Train/val/test datasets from a data spec (a TSLib CSV, a Time-MMD domain, or ``None`` for the
    built-in synthetic data). For text models (``spec["text"]``), also attaches the cached text inputs.
    Returns ``(train, val, test, d_llm or None)``."""
    from mmts_fast.data import ForecastDataset, load_csv, synthetic_table
    from mmts_fast.data.timemmd import TimeMMDDataset, load_timemmd

    kw = dict(lookback=spec["lookback"], horizon=spec["horizon"], features=spec["features"], target=spec["target"],
              freq=spec.get("freq"))
    texts, name = None, None
    if spec.get("data") and is_timemmd(Path(spec["data"])):
        table, texts = load_timemmd(spec["data"], target=spec["target"])
        name = Path(spec["data"]).stem
        train = TimeMMDDataset((table, texts), "train", **kw)
        stats = (train.mean, train.std)
        val, test = (TimeMMDDataset((table, texts), sp, stats=stats, **kw) for sp in ("val", "test"))
    else:
        if spec.get("data"):
            table = load_csv(spec["data"], target=spec["target"])
            name = Path(spec["data"]).stem
            kw["borders"] = "ett_h" if name.startswith("ETTh") else "ett_m" if name.startswith("ETTm") else "custom"
        else:
            table = synthetic_table(**spec["synthetic"])
            kw["borders"] = "custom"
        train = ForecastDataset(table, "train", **kw)
        stats = (train.mean, train.std)
        val, test = (ForecastDataset(table, sp, stats=stats, **kw) for sp in ("val", "test"))
    d_llm = None
    if spec.get("text"):
        from mmts_fast.text.conditioning import attach_text
        d_llm = attach_text(spec["model"], [train, val, test], table, texts, spec["text"], name)
    return train, val, test, d_llm


def _load_spec(run_dir: Path, data=None) -> dict:
    path = run_dir / DATA_SPEC
    if not path.exists():
        raise SystemExit(f"error: {run_dir} has no {DATA_SPEC}; is it a directory written by `mmts-fast train`?")
    spec = json.loads(path.read_text())
    if data is not None:
        spec["data"] = str(Path(data).resolve())
    return spec


# ------------------------------------------------------------------------------------------ train
def _prepare_out(out: Path, overwrite: bool) -> None:
    """Checked before any data is loaded or text encoded: ``--out`` must be a folder (or not exist yet)
    that holds no earlier run, unless ``--overwrite``, which removes the run files named in RUN_FILES
    (and MoLA's stage1/ checkpoint) and nothing else."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    found = [out / n for n in RUN_FILES if (out / n).is_file()]
    found += [out / "stage1" / n for n in RUN_FILES if (out / "stage1" / n).is_file()]
    if found and not overwrite:
        raise SystemExit(f"error: {out} already holds a run ({', '.join(str(f.relative_to(out)) for f in found)}); "
                         f"pass --overwrite to replace it, or choose another --out")
    for f in found:
        f.unlink()


def _as_path(value, keep=(), files_only=False):
    """An existing file (or folder) as an absolute path, so that eval/export work from any directory;
    names in ``keep`` (bundled encoders) and anything else (a prompt's text) unchanged."""
    if value is None or value in keep or not (Path(value).is_file() if files_only else Path(value).exists()):
        return value
    return str(Path(value).resolve())


def _warn_ignored(args, model_type: str) -> None:
    """Options the chosen model does not read: say so (on stderr) instead of ignoring them silently.
    An option counts as given when its value differs from the parser's default."""
    defaults = argparse.ArgumentParser(add_help=False)
    _train_args(defaults, out_required=False)
    defaults = vars(defaults.parse_args([]))
    mole = ("dlinear_mole", "rlinear_mole", "rmlp_mole")
    backbone = args.backbone or "rlinear"          # MoLA's backbone: its options count for MoLA
    uses = {"experts": mole + ("lemole", "mome", "mola"), "windows": WINDOW_MODELS,
            "head_dropout": mole + ("mola",),
            "dropout": ("rlinear_mole", "rmlp_mole", "lemole", "mome", "llm_ts_net", "time_llama")
            + (("mola",) if backbone != "dlinear" else ()),
            "top_k": ("mome",), "text_encoder": TEXT_MODELS, "text_layers": TEXT_MODELS,
            "static_prompt": TEXT_MODELS + ("time_llama",), "cache_dir": TEXT_MODELS, "no_text": TEXT_MODELS,
            "no_dynamic_prompt": ("lemole",), "output_form": ("lemole",), "channel_mixing": ("lemole",),
            "load_in_4bit": TEXT_MODELS + ("time_llama",), "backbone": ("mola", "time_llama"),
            "llm_layers": ("time_llama",), "segments": ("mola",), "lora_experts": ("mola",),
            "lora_rank": ("mola",), "stage2_lr": ("mola",)}
    text_only = ("text_encoder", "text_layers", "static_prompt", "cache_dir", "no_dynamic_prompt")
    for dest, models in uses.items():
        if getattr(args, dest) == defaults[dest]:
            continue
        option = "--" + dest.replace("_", "-")
        if model_type not in models:
            print(f"warning: {option} is ignored by --model {model_type} (used by: {', '.join(models)})",
                  file=sys.stderr)
        elif args.no_text and model_type in TEXT_MODELS and (dest in text_only or dest == "load_in_4bit"):
            print(f"warning: {option} is ignored with --no-text", file=sys.stderr)
        elif dest == "load_in_4bit" and args.text_lm:
            print("warning: --load-in-4bit is ignored with --text-lm (the LoRA-AMR fine-tuned LM runs dense)",
                  file=sys.stderr)


def _quiet_transformers() -> None:
    """--quiet: no Hugging Face loading / GGUF conversion bars either."""
    import functools

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:   # the GGUF de-quantisation bar is a plain tqdm of that module, outside transformers' switch
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def cmd_train(args) -> dict:
    from mmts_fast.models import get_model_class
    from mmts_fast.train import TrainConfig, fit, resolve_device, write_json

    try:
        klass = get_model_class(args.model)
        resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.windows is not None:
        if any(w < 1 for w in args.windows):
            raise SystemExit(f"error: --windows must be positive integers, got {args.windows}")
        if klass.model_type in WINDOW_MODELS and len(args.windows) != args.experts:
            raise SystemExit(f"error: --windows gives {len(args.windows)} windows but --experts is {args.experts}: "
                             f"give one window per expert")
    _warn_ignored(args, klass.model_type)
    out = Path(args.out)
    _prepare_out(out, args.overwrite)
    text_model = bool(getattr(klass, "extra_inputs", ()))    # LeMoLE, MoME, LLM-TS Net take text inputs
    spec = {"data": str(Path(args.data).resolve()) if args.data else None,
            "synthetic": {"n_rows": 4000, "n_channels": 4, "seed": 0}, "model": klass.model_type,
            "lookback": args.lookback, "horizon": args.horizon, "features": args.features, "target": args.target,
            "freq": args.freq, "text": None}
    if args.text_lm and (klass.model_type != "llm_ts_net" or args.no_text):
        raise SystemExit("error: --text-lm is for --model llm_ts_net with text (its LoRA-AMR fine-tuned LM)")
    if args.quiet and ((text_model and not args.no_text) or klass.model_type == "time_llama"):
        _quiet_transformers()
    if text_model and not args.no_text:
        from mmts_fast.text.encoders import BUNDLED
        spec["text"] = {"encoder": _as_path(args.text_encoder or "minilm", BUNDLED), "layers": args.text_layers,
                        "load_in_4bit": args.load_in_4bit,
                        "static_prompt": _as_path(args.static_prompt, files_only=True),
                        "cache_dir": str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
                        "progress": not args.quiet}
        if args.text_lm:
            spec["text"]["text_lm"] = _as_path(args.text_lm, BUNDLED)
    if args.data is None:
        print("no --data given: training on the built-in synthetic series (4 channels, hourly)")
    try:
        train, val, test, d_llm = build_datasets(spec)
    except (ValueError, FileNotFoundError, ImportError) as e:   # the loader's "pass freq" is --freq here
        raise SystemExit("error: " + str(e).replace("pass freq explicitly", "pass --freq (h, t, d, w, m, ...)"))
    spec.update(columns=train.columns, freq=train.freq, n_time_features=train.n_time_features)

    if klass.model_type == "mola":
        return _train_mola(args, spec, train, val, test)
    options = _model_options(args, train, horizon=args.horizon, d_llm=d_llm, output_form=args.output_form,
                             channel_independent=False if args.channel_mixing else None, top_k=args.top_k)
    if spec["text"] and not args.text_lm:   # (the --text-lm path tokenizes for its own LM, recorded as text_lm)
        options.update(text_encoder=spec["text"]["encoder"])
    if text_model and args.no_text:
        options.update(use_static=False, use_dynamic=False, use_text=False)
    if args.text_lm:
        options.update(text_lm=spec["text"]["text_lm"], text_lm_layers=args.text_layers)
    if args.no_dynamic_prompt:
        options.update(use_dynamic=False)
    if klass.model_type == "time_llama":   # LLM backbone; the prompt is the data set's description
        from mmts_fast.text.conditioning import describe
        name = Path(spec["data"]).stem if spec["data"] else None
        options.update(backbone=_as_path(args.backbone or "smollm2", ("smollm2", "minilm")),
                       n_llm_layers=args.llm_layers,
                       load_in_4bit=args.load_in_4bit,
                       prompt=describe({"static_prompt": args.static_prompt}, name, train.columns))
    recipe = dict(MODEL_RECIPES.get(klass.model_type, {}))
    recipe.update({k: v for k, v in (("lr", args.lr), ("lr_decay", args.lr_decay)) if v is not None})
    try:
        config = _config(klass, options)
        torch.manual_seed(args.seed)
        model = klass(config)
        tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
                           seed=args.seed, device=args.device, progress=not args.quiet,
                           fused_optimizer=args.fused_optimizer, **recipe)
    except ValueError as e:
        hint = " (set it with --top-k, at most --experts)" if "top_k" in str(e) else ""
        raise SystemExit(f"error: {e}{hint}")
    print(f"{klass.__name__}: {model.num_parameters():,} parameters; train/val/test windows "
          f"{len(train)}/{len(val)}/{len(test)}; writing to {out}")
    # data.json goes in with the first checkpoint: a run that fails before leaves no data.json alone
    metrics = fit(model, train, val, test, tcfg, out_dir=out, on_save=lambda: write_json(out / DATA_SPEC, spec))
    metrics["model"] = {"model_type": klass.model_type, **config.__dict__}
    metrics["data"] = {k: spec[k] for k in ("data", "lookback", "horizon", "features", "target", "text")}
    write_json(out / "metrics.json", metrics)
    t = metrics["test"]
    print(f"test  mse {t['mse']:.4f}  mae {t['mae']:.4f}  (best epoch {metrics['best_epoch']}, "
          f"{metrics['train_time_s']:.0f}s)")
    return metrics


def _model_options(args, train, **extra) -> dict:
    """Config values from the command line and the data; each model keeps the ones its config has."""
    return dict(lookback=args.lookback, channels=train.n_channels, n_experts=args.experts,
                n_time_features=train.n_time_features, head_dropout=args.head_dropout, windows=args.windows,
                dropout=args.dropout, **extra)


def _config(klass, options: dict):
    names = {f.name for f in fields(klass.config_class)}
    return klass.config_class(**{k: v for k, v in options.items() if k in names and v is not None})


def _train_mola(args, spec, train, val, test) -> dict:
    """MoLA: stage 1 trains the backbone with a one-step head, stage 2 the segment LoRA mixture."""
    from mmts_fast.models import MoLA, get_model_class
    from mmts_fast.models.mola import BACKBONES
    from mmts_fast.train import TrainConfig, fit, write_json

    args.backbone = args.backbone or "rlinear"
    if args.backbone not in BACKBONES:
        raise SystemExit(f"error: unknown MoLA backbone {args.backbone!r}; choose one of {', '.join(BACKBONES)}")
    out = Path(args.out)
    tr1, va1, te1, _ = build_datasets({**spec, "horizon": 1})   # a bad one is main()'s one-line error
    klass = get_model_class(BACKBONES[args.backbone])
    common = dict(epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
                  device=args.device, progress=not args.quiet, fused_optimizer=args.fused_optimizer)
    try:
        torch.manual_seed(args.seed)
        backbone = klass(_config(klass, _model_options(args, train, horizon=1)))
        stage1_cfg = TrainConfig(lr=args.lr or 0.005, lr_decay=args.lr_decay or 0.5, **common)
        stage2_cfg = TrainConfig(lr=args.stage2_lr, lr_decay=args.lr_decay or 0.5, **common)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"MoLA stage 1: {klass.__name__} with a one-step head")
    m1 = fit(backbone, tr1, va1, te1, stage1_cfg, out_dir=out / "stage1")
    model = MoLA.from_backbone(backbone.cpu(), args.horizon, segments=args.segments, n_lora=args.lora_experts,
                               rank=args.lora_rank)
    print(f"MoLA stage 2: {args.segments} segments, {args.lora_experts} LoRA experts of rank {args.lora_rank}; "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    metrics = fit(model, train, val, test, stage2_cfg, out_dir=out, on_save=lambda: write_json(out / DATA_SPEC, spec))
    metrics["stage1"] = {k: m1[k] for k in ("val", "test", "best_epoch", "train_time_s")}
    metrics["model"] = {"model_type": "mola", **model.config.__dict__}
    metrics["data"] = {k: spec[k] for k in ("data", "lookback", "horizon", "features", "target")}
    write_json(out / "metrics.json", metrics)
    t = metrics["test"]
    print(f"test  mse {t['mse']:.4f}  mae {t['mae']:.4f}  (stage 1 one-step test mse {m1['test']['mse']:.4f})")
    return metrics


# ------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> dict:
    from mmts_fast.models import ForecastModel
    from mmts_fast.plot import plot_forecasts
    from mmts_fast.train import evaluate, resolve_device

    run_dir = Path(args.run_dir)
    device = resolve_device(args.device)
    spec = _load_spec(run_dir, args.data)
    model = ForecastModel.from_pretrained(run_dir).to(device)
    try:
        _, _, test, _ = build_datasets(spec)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    if test.n_channels != model.config.channels:
        raise SystemExit(f"error: the data has {test.n_channels} channels but the model was trained on "
                         f"{model.config.channels}")
    m = evaluate(model, test)
    print(f"test  mse {m['mse']:.4f}  mae {m['mae']:.4f}  ({len(test)} windows, {spec['data'] or 'built-in data'})")
    png = Path(args.plot) if args.plot else run_dir / "forecast.png"
    plot_forecasts(model, test, png)
    print(f"plot: {png}")
    return m


# ----------------------------------------------------------------------------------------- export
def cmd_export(args) -> float:
    from mmts_fast.export import export_onnx, verify_onnx
    from mmts_fast.models import ForecastModel

    run_dir = Path(args.run_dir)
    model = ForecastModel.from_pretrained(run_dir)
    if getattr(model, "is_nf4", False):   # ONNX has no NF4 ops: the file gets the de-quantised weights
        model.export_dense()
        print("the NF4 backbone is exported with its de-quantised (dense) weights")
    out = Path(args.out) if args.out else run_dir / "model.onnx"
    try:   # check on real test windows (and their cached text inputs) when the data is at hand
        _, _, test, _ = build_datasets(_load_spec(run_dir, getattr(args, "data", None)))
        idx = torch.arange(min(len(test), 16))
        x, _, xm, _ = test.batch(idx)[:4]
        extra = model.export_inputs(test.extras(idx)) if hasattr(test, "extras") else {}
    except (SystemExit, ValueError, FileNotFoundError, ImportError) as e:
        if getattr(model, "extra_inputs", ()):
            raise SystemExit(f"error: exporting {type(model).__name__} needs its data and text cache: {e}")
        cfg = model.config
        x, xm = torch.randn(16, cfg.lookback, cfg.channels), torch.rand(16, cfg.lookback, cfg.n_time_features) - 0.5
        extra = {}
    export_onnx(model, out, extra_inputs={k: v[:2] for k, v in extra.items()} or None)
    err = verify_onnx(model, out, x, xm, atol=args.atol, extra_inputs=extra or None)
    print(f"exported {out}; ONNX Runtime vs PyTorch max abs error {err:.2e} (batch {x.shape[0]}, tolerance {args.atol:g})")
    return err


def cmd_run(args):
    cmd_train(args)
    cmd_eval(argparse.Namespace(run_dir=args.out, data=None, plot=None, device=args.device))
    cmd_export(argparse.Namespace(run_dir=args.out, out=None, atol=1e-4, data=None))


# ----------------------------------------------------------------------------------------- parser
def _train_args(p: argparse.ArgumentParser, out_required: bool = True):
    p.add_argument("--model", default="rlinear_mole", help="dlinear_mole | rlinear_mole | rmlp_mole | lemole | mome | mola | llm_ts_net | time_llama")
    p.add_argument("--data", default=None, help="TSLib CSV (date column + channels) or a Time-MMD domain "
                   "folder/CSV; built-in data if omitted")
    p.add_argument("--lookback", type=int, default=336)
    p.add_argument("--horizon", type=int, default=96)
    p.add_argument("--experts", type=int, default=4, help="number of linear experts (1 = DLinear/RLinear)")
    p.add_argument("--windows", type=int, nargs="+", default=None, help="per-expert lookback windows")
    p.add_argument("--head-dropout", type=float, default=0.2)
    p.add_argument("--dropout", type=float, default=None, help="input dropout (RLinear/RMLP; default 0.1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (MoLE recipe: 0.005; MoME: 1e-3)")
    p.add_argument("--lr-decay", type=float, default=None, help="lr factor per epoch (default 0.5)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--seed", type=int, default=2021)
    p.add_argument("--features", default="M", choices=["M", "S", "MS"])
    p.add_argument("--target", default="OT")
    p.add_argument("--freq", default=None, help="data frequency (h, t, d, w, ...) when it cannot be inferred "
                   "from the dates")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fused-optimizer", action="store_true", help="fused Adam/AdamW kernel (faster)")
    g = p.add_argument_group("MoLA (--model mola) and Time-LlaMA (--model time_llama)")
    g.add_argument("--backbone", default=None, help="MoLA: dlinear | rlinear (default) | rmlp, trained with a "
                   "one-step head first; Time-LlaMA: the LLM, smollm2 (default) or a local model folder")
    g.add_argument("--llm-layers", type=int, default=2, help="Time-LlaMA: first K decoder layers of the LLM")
    g.add_argument("--segments", type=int, default=4, help="forecast-step segments S")
    g.add_argument("--lora-experts", type=int, default=4, help="shared LoRA experts P")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--stage2-lr", type=float, default=0.005, help="learning rate of stage 2 (the LoRA experts)")
    g = p.add_argument_group("text (lemole, mome, llm_ts_net)")
    g.add_argument("--text-encoder", default=None, help="minilm (default) | smollm2 | path to a Hugging Face "
                   "model folder")
    g.add_argument("--text-layers", type=int, default=None, help="keep only the first K layers of the text LLM")
    g.add_argument("--text-lm", default=None, help="LLM-TS Net: fine-tune this LM (smollm2 or a folder) with "
                   "LoRA-AMR on each window's own text; it runs in every step (--text-layers K, default 2); "
                   "default: frozen cached --text-encoder states")
    g.add_argument("--load-in-4bit", action="store_true", help="NF4 (bitsandbytes) text encoder / Time-LlaMA backbone")
    g.add_argument("--static-prompt", default=None, help="dataset description: text, a .txt file or a data set name")
    g.add_argument("--cache-dir", default=None, help="embedding cache (default $MMTS_FAST_CACHE or "
                   "~/.cache/mmts_fast/embeddings)")
    g.add_argument("--no-text", action="store_true", help="ablation: the same model without its text inputs")
    g.add_argument("--no-dynamic-prompt", action="store_true", help="LeMoLE: static prompt only")
    g.add_argument("--output-form", default=None, choices=["paper", "code"], help="LeMoLE output (default paper)")
    g.add_argument("--channel-mixing", action="store_true",
                   help="LeMoLE: CNNs mix across channels as in the paper (default: per channel)")
    g.add_argument("--top-k", type=int, default=None, help="MoME: experts per token (default 2)")
    p.add_argument("--out", required=out_required, default=None, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its run files "
                   "only) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmts-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="train a model; writes the best checkpoint and metrics.json"))
    p = sub.add_parser("eval", help="test MSE/MAE and a forecast plot")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="CSV (default: the data the run was trained on)")
    p.add_argument("--plot", default=None, help="PNG path (default RUN_DIR/forecast.png)")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("export", help="ONNX export, verified in ONNX Runtime")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="ONNX path (default RUN_DIR/model.onnx)")
    p.add_argument("--data", default=None, help="the run's data, if it moved (text models need it to export)")
    p.add_argument("--atol", type=float, default=1e-4)
    p = sub.add_parser("run", help="train + eval + export (the README's main job)")
    _train_args(p, out_required=False)
    p.set_defaults(out="runs/demo")
    return parser


# The errors a user's input can cause: printed as one line (exit 1); MMTS_FAST_DEBUG=1 shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError, FloatingPointError, ImportError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "run": cmd_run}[args.command](args)
    except USER_ERRORS as e:
        if os.environ.get("MMTS_FAST_DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from e
    return 0


if __name__ == "__main__":
    sys.exit(main())
