"""Command line: ``mmts-fast train | eval | export | run``.

    mmts-fast train --model rlinear_mole --data ETTh1.csv --lookback 336 --horizon 96 --seed 2021 --out DIR
    mmts-fast eval DIR [--data CSV]             # MSE/MAE on the test split and DIR/forecast.png
    mmts-fast export DIR [--out model.onnx] [--data CSV]   # ONNX, checked in ONNX Runtime
    mmts-fast run [--data CSV] --out DIR        # train, eval and export in one go (built-in data by default)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

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
    from mmts_fast.data import ForecastDataset, infer_freq, load_csv, synthetic_table
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
            kw["borders"] = spec.get("borders") or "auto"
            if kw["borders"] == "auto":   # ETTh*/ETTm* file names get ETT borders, other files 70/10/20
                kw["borders"] = "ett_h" if name.startswith("ETTh") else "ett_m" if name.startswith("ETTm") else "custom"
        else:
            table = synthetic_table(**spec["synthetic"])
            kw["borders"] = "custom"
        train = ForecastDataset(table, "train", **kw)
        stats = (train.mean, train.std)
        val, test = (ForecastDataset(table, sp, stats=stats, **kw) for sp in ("val", "test"))
    if spec.get("columns") is not None:   # a trained run's spec (eval/export): what the dates alone say,
        try:                                # compared with the run's freq in _check_data
            test.inferred_freq = infer_freq(table.dates)
        except ValueError:
            test.inferred_freq = None
    d_llm = None
    if spec.get("text"):
        from mmts_fast.text.conditioning import attach_text
        d_llm = attach_text(spec["model"], [train, val, test], table, texts, spec["text"], name)
    return train, val, test, d_llm


def _load_spec(run_dir: Path, data=None) -> dict:
    path = run_dir / DATA_SPEC
    if not path.exists():
        raise SystemExit(f"error: {run_dir} has no {DATA_SPEC}; is it a directory written by `mmts-fast train`?")
    try:
        spec = json.loads(path.read_text())
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not a readable {DATA_SPEC} ({e}); re-run `mmts-fast train` "
                         "to write it again") from None
    if data is not None:
        spec["data"] = str(Path(data).resolve())
    return spec


# ------------------------------------------------------------------------------------------ train
def _encoder_record(text: dict) -> str:
    """The encoder as config.json records it: its name, plus the ``TextEncoder.from_name`` options that
    change its embeddings (``smollm2 (layers=2, load_in_4bit=True)``), so a checkpoint alone says what to feed."""
    opts = [f"layers={text['layers']}"] if text.get("layers") else []
    opts += ["load_in_4bit=True"] if text.get("load_in_4bit") else []
    return text["encoder"] + (f" ({', '.join(opts)})" if opts else "")


def _data_error(e: Exception) -> SystemExit:
    """A data loading error as the CLI says it: the loader's "pass freq"/"borders='custom'" are options here."""
    return SystemExit("error: " + str(e).replace("pass freq explicitly", "pass --freq (h, t, d, w, m, ...)")
                      .replace("use borders='custom' for other files (--borders custom in the CLI)",
                               "pass --borders custom for other files"))


def _prepare_out(out: Path, overwrite: bool):
    """Checked before any data is loaded or text encoded: ``--out`` must be a folder (or not exist yet)
    that holds no earlier run, unless ``--overwrite``, which removes the run files named in RUN_FILES
    (and MoLA's stage1/ checkpoint) and nothing else. Returns the function that removes them, which
    training calls just before it writes the new run's first file (``fit(before_save=...)``): a run that
    fails before that (a typo in --data, bad options) leaves the old run as it was."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file, not a folder")
    found = [out / n for n in RUN_FILES if (out / n).is_file()]
    found += [out / "stage1" / n for n in RUN_FILES if (out / "stage1" / n).is_file()]
    if found and not overwrite:
        raise SystemExit(f"error: {out} already holds a run ({', '.join(str(f.relative_to(out)) for f in found)}); "
                         f"pass --overwrite to replace it, or choose another --out")
    def remove_old_run() -> None:
        while found:   # emptied by the first call: MoLA's stage 2 must not remove stage 1's new checkpoint
            found.pop().unlink(missing_ok=True)
    return remove_old_run


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
    from mmts_fast.train import fit, resolve_device, write_json

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
    remove_old_run = _prepare_out(out, args.overwrite)
    text_model = bool(getattr(klass, "extra_inputs", ()))    # LeMoLE, MoME, LLM-TS Net take text inputs
    spec = {"data": str(Path(args.data).resolve()) if args.data else None,
            "synthetic": {"n_rows": 4000, "n_channels": 4, "seed": 0}, "model": klass.model_type,
            "lookback": args.lookback, "horizon": args.horizon, "features": args.features, "target": args.target or "OT",
            "freq": args.freq, "borders": args.borders, "text": None}
    if args.borders not in ("auto", "custom") and (args.data is None or is_timemmd(Path(args.data))):
        print(f"warning: --borders {args.borders} is ignored for {'a Time-MMD domain' if args.data else 'built-in data'}"
              " (70/10/20 split)", file=sys.stderr)
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
    if spec["text"]:   # a bad option fails now, not after the text encoder has run (minutes for SmolLM2)
        _train_configs(args, klass, spec, SimpleNamespace(n_channels=1, n_time_features=1, columns=["OT"]), d_llm=1)
    if args.data is None:
        print("no --data given: training on the built-in synthetic series (4 channels, hourly)")
    try:
        train, val, test, d_llm = build_datasets(spec)
    except (ValueError, FileNotFoundError, ImportError) as e:   # the loader's "pass freq" is --freq here
        raise _data_error(e)
    if args.target is not None and args.target not in train.columns:   # named, so it must exist (also OT)
        raise SystemExit(f"error: target column {args.target!r} not found in {list(train.columns)}")
    spec.update(columns=train.columns, freq=train.freq, n_time_features=train.n_time_features)
    if len(train) < args.batch_size:   # before anything is written (MoLA's stage 1 has more windows)
        raise SystemExit(f"error: the train split has {len(train)} windows, fewer than one batch of "
                         f"{args.batch_size}: lower --batch-size")

    if klass.model_type == "mola":
        return _train_mola(args, spec, train, val, test, remove_old_run)
    config, tcfg = _train_configs(args, klass, spec, train, d_llm)
    try:
        torch.manual_seed(args.seed)
        model = klass(config)
    except ValueError as e:
        raise _config_error(e)
    print(f"{klass.__name__}: {model.num_parameters():,} parameters; train/val/test windows "
          f"{len(train)}/{len(val)}/{len(test)}; writing to {out}")
    # data.json goes in with the first checkpoint: a run that fails before leaves no data.json alone
    metrics = fit(model, train, val, test, tcfg, out_dir=out, on_save=lambda: write_json(out / DATA_SPEC, spec),
                  before_save=remove_old_run)
    metrics["model"] = {"model_type": klass.model_type, **config.__dict__}
    metrics["data"] = {k: spec[k] for k in ("data", "lookback", "horizon", "features", "target", "text")}
    write_json(out / "metrics.json", metrics)
    t = metrics["test"]
    print(f"test  mse {t['mse']:.4f}  mae {t['mae']:.4f}  (best epoch {metrics['best_epoch']}, "
          f"{metrics['train_time_s']:.0f}s)")
    return metrics


def _train_configs(args, klass, spec: dict, train, d_llm):
    """(model config, TrainConfig) from the command line and the data; a bad value is a one-line error.
    ``train`` needs ``n_channels``, ``n_time_features`` and ``columns`` only (a stand-in before the data)."""
    from mmts_fast.train import TrainConfig

    text_model = bool(getattr(klass, "extra_inputs", ()))
    options = _model_options(args, train, horizon=args.horizon, d_llm=d_llm, output_form=args.output_form,
                             channel_independent=False if args.channel_mixing else None, top_k=args.top_k)
    if spec["text"] and not args.text_lm:   # (the --text-lm path tokenizes for its own LM, recorded as text_lm)
        options.update(text_encoder=_encoder_record(spec["text"]))
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
        return _config(klass, options), TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, patience=args.patience, seed=args.seed,
            device=args.device, progress=not args.quiet, fused_optimizer=args.fused_optimizer,
            lr_schedule=args.lr_schedule, **recipe)
    except ValueError as e:
        raise _config_error(e)


def _config_error(e: ValueError) -> SystemExit:
    hint = " (set it with --top-k, at most --experts)" if "top_k" in str(e) else ""
    return SystemExit(f"error: {e}{hint}")


def _model_options(args, train, **extra) -> dict:
    """Config values from the command line and the data; each model keeps the ones its config has."""
    return dict(lookback=args.lookback, channels=train.n_channels, n_experts=args.experts,
                n_time_features=train.n_time_features, head_dropout=args.head_dropout, windows=args.windows,
                dropout=args.dropout, **extra)


def _config(klass, options: dict):
    names = {f.name for f in fields(klass.config_class)}
    return klass.config_class(**{k: v for k, v in options.items() if k in names and v is not None})


def _train_mola(args, spec, train, val, test, remove_old_run=None) -> dict:
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
                  device=args.device, progress=not args.quiet, fused_optimizer=args.fused_optimizer,
                  lr_schedule=args.lr_schedule)
    try:
        torch.manual_seed(args.seed)
        backbone = klass(_config(klass, _model_options(args, train, horizon=1)))
        decay = 0.5 if args.lr_decay is None else args.lr_decay
        stage1_cfg = TrainConfig(lr=0.005 if args.lr is None else args.lr, lr_decay=decay, **common)
        stage2_cfg = TrainConfig(lr=args.stage2_lr, lr_decay=decay, **common)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"MoLA stage 1: {klass.__name__} with a one-step head")
    m1 = fit(backbone, tr1, va1, te1, stage1_cfg, out_dir=out / "stage1", before_save=remove_old_run)
    model = MoLA.from_backbone(backbone.cpu(), args.horizon, segments=args.segments, n_lora=args.lora_experts,
                               rank=args.lora_rank)
    print(f"MoLA stage 2: {args.segments} segments, {args.lora_experts} LoRA experts of rank {args.lora_rank}; "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    metrics = fit(model, train, val, test, stage2_cfg, out_dir=out, on_save=lambda: write_json(out / DATA_SPEC, spec),
                  before_save=remove_old_run)
    metrics["stage1"] = {k: m1[k] for k in ("val", "test", "best_epoch", "train_time_s")}
    metrics["model"] = {"model_type": "mola", **model.config.__dict__}
    metrics["data"] = {k: spec[k] for k in ("data", "lookback", "horizon", "features", "target")}
    write_json(out / "metrics.json", metrics)
    t = metrics["test"]
    print(f"test  mse {t['mse']:.4f}  mae {t['mae']:.4f}  (stage 1 one-step test mse {m1['test']['mse']:.4f})")
    return metrics


# ------------------------------------------------------------------------------------------- eval
def _load_model(run_dir: Path):
    """``from_pretrained`` with a damaged file as one error line naming it."""
    from safetensors import SafetensorError

    from mmts_fast.models import ForecastModel
    try:
        return ForecastModel.from_pretrained(run_dir)
    except SafetensorError as e:   # (a broken config.json is a ValueError naming it, from from_pretrained)
        raise SystemExit(f"error: {run_dir / 'model.safetensors'} is not a readable safetensors file ({e}); "
                         "it may be damaged: train the run again") from None


def _check_data(spec: dict, test, model, data) -> None:
    """Data other than the run's own must have the columns the model was trained on (names and order, as
    data.json records them); a different frequency of its dates is a warning (time features use the run's)."""
    columns = spec.get("columns")
    if columns is not None and list(test.columns) != list(columns):
        raise SystemExit(f"error: the data's columns {list(test.columns)} differ from the columns the model was "
                         f"trained on {list(columns)}")
    if test.n_channels != model.config.channels:
        raise SystemExit(f"error: the data has {test.n_channels} channels but the model was trained on "
                         f"{model.config.channels}")
    inferred = getattr(test, "inferred_freq", None)
    if data is not None and inferred is not None and spec.get("freq") and inferred != spec["freq"]:
        print(f"warning: the dates of {data} look like freq {inferred!r} but the model was trained with freq "
              f"{spec['freq']!r}; its time features are computed as {spec['freq']!r}", file=sys.stderr)


def cmd_eval(args) -> dict:
    from mmts_fast.plot import plot_forecasts
    from mmts_fast.train import evaluate, resolve_device

    run_dir = Path(args.run_dir)
    device = resolve_device(args.device)
    spec = _load_spec(run_dir, args.data)
    model = _load_model(run_dir).to(device)
    try:
        _, _, test, _ = build_datasets(spec)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise _data_error(e)
    _check_data(spec, test, model, args.data)
    m = evaluate(model, test)
    print(f"test  mse {m['mse']:.4f}  mae {m['mae']:.4f}  ({len(test)} windows, {spec['data'] or 'built-in data'})")
    png = plot_forecasts(model, test, args.plot if args.plot else run_dir / "forecast.png")
    print(f"plot: {png}")
    return m


# ----------------------------------------------------------------------------------------- export
def cmd_export(args) -> float:
    from mmts_fast.export import export_onnx, verify_onnx

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "model.onnx"
    if out.is_dir():
        raise SystemExit(f"error: --out {out} is a folder; give the ONNX file's path (e.g. {out / 'model.onnx'})")
    if out.exists() and out.suffix.lower() != ".onnx":   # a previous export may be replaced, nothing else
        raise SystemExit(f"error: --out {out} exists and is not an .onnx file; refusing to write over it "
                         "(choose another path)")
    model = _load_model(run_dir)
    if getattr(model, "is_nf4", False):   # ONNX has no NF4 ops: the file gets the de-quantised weights
        model.export_dense()
        print("the NF4 backbone is exported with its de-quantised (dense) weights")
    data = getattr(args, "data", None)
    # check on real test windows (and their cached text inputs) when the data is at hand; data.json must
    # be readable when present, and data the user named must load
    spec = _load_spec(run_dir, data) if data is not None or (run_dir / DATA_SPEC).exists() else None
    try:
        if spec is None:
            raise FileNotFoundError(f"{run_dir} has no {DATA_SPEC}")
        _, _, test, _ = build_datasets(spec)
        _check_data(spec, test, model, data)
        idx = torch.arange(min(len(test), 16))
        x, _, xm, _ = test.batch(idx)[:4]
        extra = model.export_inputs(test.extras(idx)) if hasattr(test, "extras") else {}
    except (ValueError, FileNotFoundError, ImportError) as e:
        if data is not None:
            raise _data_error(e)
        if getattr(model, "extra_inputs", ()):
            raise SystemExit(f"error: exporting {type(model).__name__} needs its data and text cache: {e}")
        print(f"warning: the run's data could not be loaded ({e}); checking the export on random inputs "
              "(pass --data to check it on the data)", file=sys.stderr)
        cfg = model.config
        x, xm = torch.randn(16, cfg.lookback, cfg.channels), torch.rand(16, cfg.lookback, cfg.n_time_features) - 0.5
        extra = {}
    export_onnx(model, out, extra_inputs={k: v[:2] for k, v in extra.items()} or None)
    try:
        err = verify_onnx(model, out, x, xm, atol=args.atol, extra_inputs=extra or None)
    except AssertionError as e:
        raise SystemExit(f"error: the ONNX Runtime check failed: {e}; the exported file was left at {out}") from None
    print(f"exported {out}; ONNX Runtime vs PyTorch max abs error {err:.2e} (batch {x.shape[0]}, tolerance {args.atol:g})")
    return err


def cmd_run(args):
    cmd_train(args)
    cmd_eval(argparse.Namespace(run_dir=args.out, data=None, plot=None, device=args.device))
    cmd_export(argparse.Namespace(run_dir=args.out, out=None, atol=1e-4, data=None))


# ----------------------------------------------------------------------------------------- parser
def _train_args(p: argparse.ArgumentParser, out_required: bool = True, out_default=None):
    p.add_argument("--model", default="rlinear_mole", help="dlinear_mole | rlinear_mole | rmlp_mole | lemole | mome | mola | llm_ts_net | time_llama")
    p.add_argument("--data", default=None, help="TSLib CSV (date column + channels) or a Time-MMD domain "
                   "folder/CSV; built-in data if omitted")
    p.add_argument("--lookback", type=int, default=336, help="input window length L (default %(default)s)")
    p.add_argument("--horizon", type=int, default=96, help="forecast length H (default %(default)s)")
    p.add_argument("--experts", type=int, default=4, help="number of linear experts (1 = DLinear/RLinear)")
    p.add_argument("--windows", type=int, nargs="+", default=None, help="per-expert lookback windows")
    p.add_argument("--head-dropout", type=float, default=0.2, help="dropout on the experts' heads (MoLE "
                   "family, MoLA; default %(default)s)")
    p.add_argument("--dropout", type=float, default=None, help="dropout (rlinear_mole, rmlp_mole, lemole, mome, "
                   "llm_ts_net, time_llama, mola with an rlinear/rmlp backbone; default 0.1)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (MoLE recipe: 0.005; MoME, LLM-TS Net: "
                   "1e-3); with --model mola it sets stage 1 only (stage 2: --stage2-lr)")
    p.add_argument("--lr-decay", type=float, default=None, help="lr factor per epoch, > 0 (default 0.5)")
    p.add_argument("--lr-schedule", choices=["every", "tslib"], default="every",
                   help="every: decay after every epoch (default, SPEC's recipe); tslib: as Time-Series-Library's "
                        "type1 runs, the base lr for the first two epochs")
    p.add_argument("--epochs", type=int, default=40, help="most epochs; early stopping may end sooner "
                   "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default %(default)s)")
    p.add_argument("--patience", type=int, default=6, help="early stopping: epochs without a better validation "
                   "MSE (default %(default)s)")
    p.add_argument("--seed", type=int, default=2021, help="random seed (default %(default)s)")
    p.add_argument("--features", default="M", choices=["M", "S", "MS"], help="M: all channels in and out; S: "
                   "the target only; MS: all in, the target out (default %(default)s)")
    p.add_argument("--target", default=None, help="target column, put last (default OT; with --features M "
                   "a file without OT is fine unless --target is given)")
    p.add_argument("--freq", default=None, help="data frequency for the time features, when the dates do not "
                   "give it: a unit (s, t or min, h, d, b, w, m) with an optional count, e.g. 15min, 3h")
    p.add_argument("--borders", default="auto", choices=["auto", "ett_h", "ett_m", "custom"],
                   help="train/val/test split: ett_h / ett_m (12/4/4 months of ETT rows), custom (70/10/20); "
                   "auto (default): ett_h for ETTh* files, ett_m for ETTm*, else custom")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--fused-optimizer", action="store_true", help="fused Adam/AdamW kernel (faster)")
    g = p.add_argument_group("MoLA (--model mola) and Time-LlaMA (--model time_llama)")
    g.add_argument("--backbone", default=None, help="MoLA: dlinear | rlinear (default) | rmlp, trained with a "
                   "one-step head first; Time-LlaMA: the LLM, smollm2 (default) or a local model folder")
    g.add_argument("--llm-layers", type=int, default=2, help="Time-LlaMA: first K decoder layers of the LLM")
    g.add_argument("--segments", type=int, default=4, help="forecast-step segments S")
    g.add_argument("--lora-experts", type=int, default=4, help="shared LoRA experts P")
    g.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA experts (default %(default)s)")
    g.add_argument("--stage2-lr", type=float, default=0.005, help="learning rate of stage 2 (the LoRA experts; "
                   "default %(default)s)")
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
    p.add_argument("--out", required=out_required, default=out_default,
                   help="run directory" + (" (default %(default)s)" if out_default else ""))
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (its run files "
                   "only, removed when the new run writes its first checkpoint) instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmts-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="train a model; writes the best checkpoint and metrics.json"))
    p = sub.add_parser("eval", help="test MSE/MAE and a forecast plot")
    p.add_argument("run_dir")
    p.add_argument("--data", default=None, help="CSV or Time-MMD domain to score instead of the run's data "
                   "(the default); it needs the run's columns, and its own test split is scored, scaled with a "
                   "scaler fitted on its own train split")
    p.add_argument("--plot", default=None, help="PNG path, or a folder to write forecast.png in (default "
                   "RUN_DIR/forecast.png)")
    p.add_argument("--device", default="auto")
    p = sub.add_parser("export", help="ONNX export, verified in ONNX Runtime")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="ONNX path (default RUN_DIR/model.onnx); an existing file "
                   "there is replaced only if it is an .onnx file")
    p.add_argument("--data", default=None, help="the run's data, if it moved (text models need it to export)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest ONNX Runtime vs PyTorch absolute difference "
                   "accepted (default %(default)s)")
    p = sub.add_parser("run", help="train + eval + export (the README's main job)")
    _train_args(p, out_required=False, out_default="runs/demo")
    return parser


# The errors a user's input can cause: printed as one line (exit 1); MMTS_FAST_DEBUG=1 shows the traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError, FloatingPointError, ImportError)


class _WarningLines(logging.Handler):
    """The loaders' logged warnings (dropped columns, ...) as the CLI's own ``warning: ...`` lines on stderr."""

    def emit(self, record):
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def main(argv=None) -> int:
    log = logging.getLogger("mmts_fast.data")
    if not any(isinstance(h, _WarningLines) for h in log.handlers):
        handler = _WarningLines(logging.WARNING)
        log.addHandler(handler)
    args = build_parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "run": cmd_run}[args.command](args)
    except USER_ERRORS as e:
        if os.environ.get("MMTS_FAST_DEBUG"):
            raise
        raise SystemExit(f"error: {e}") from e
    except SystemExit as e:   # the CLI's own one-line errors: with MMTS_FAST_DEBUG, the error underneath too
        underneath = e.__cause__ or e.__context__
        if os.environ.get("MMTS_FAST_DEBUG") and underneath is not None:
            traceback.print_exception(underneath, file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
