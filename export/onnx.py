"""ONNX export of the forecasting models, and its check in ONNX Runtime.

The exported graph is the plain-PyTorch reference path (``mmts_fast.use_backend("torch")``), so it
holds only standard ONNX operators, never the Triton custom op. Graph signature::

    inputs   x_enc       [B, L, C]  float32   scaled values
             x_mark_enc  [B, L, F]  float32   time features
             <extra>     [B, ...]             optional extra keyword inputs (``extra_inputs``)
    output   y           [B, H, C]  float32

with a dynamic batch axis ``B``. Typical use::

    path = export_onnx(model, "out/model.onnx")
    err = verify_onnx(model, path, x_enc, x_mark_enc)      # raises if err > atol
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from mmts_fast.backend import use_backend

logger = logging.getLogger(__name__)

INPUT_NAMES = ("x_enc", "x_mark_enc")
OUTPUT_NAME = "y"
STANDARD_DOMAINS = ("", "ai.onnx")
_EMBED_LIMIT = 1 << 30   # weights above 1 GiB go to an external data file (protobuf caps a file at 2 GiB)


class _Positional(nn.Module):
    """Calls ``model(x_enc, x_mark_enc, **extras)`` from positional inputs, so that both exporters
    see one flat, ordered list of graph inputs."""

    def __init__(self, model: nn.Module, extra_names: Sequence[str]):
        super().__init__()
        self.model, self.extra_names = model, tuple(extra_names)

    def forward(self, x_enc: Tensor, x_mark_enc: Tensor, *extras: Tensor) -> Tensor:
        return self.model(x_enc, x_mark_enc, **dict(zip(self.extra_names, extras)))


@contextlib.contextmanager
def _reference_mode(model: nn.Module):
    """The model in eval mode, on CPU, floating tensors in fp32, ops on the torch backend; every
    parameter and buffer gets its own tensor back afterwards (same device, dtype and bits: an fp64
    model is not rounded through fp32), and the training flag too."""
    was_training = model.training
    saved = {name: t.data for name, t in [*model.named_parameters(), *model.named_buffers()]}
    try:
        model.to(device="cpu", dtype=torch.float32)   # dtype applies to floating tensors only
        model.eval()
        with use_backend("torch"), torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        for name, original in saved.items():
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            t = getattr(module, attr)
            if t.data is not original:
                if isinstance(t, nn.Parameter):
                    t.data = original
                else:
                    module._buffers[attr] = original


def _graph_form(model: nn.Module, extra_inputs: Optional[Mapping[str, Tensor]]) -> dict:
    """The extra inputs as the graph takes them: ``model.export_inputs(extra)`` where the model has it
    (LeMoLE's ``dynamic_table`` + ``dynamic_index`` -> ``dynamic_emb``); inputs already in that form pass."""
    extra = dict(extra_inputs or {})
    convert = getattr(model, "export_inputs", None)
    return dict(convert(extra)) if extra and callable(convert) else extra


def _example_inputs(model, lookback, channels, n_time_features, batch_size, extra_inputs):
    cfg = getattr(model, "config", None)

    def pick(value, name):
        value = value if value is not None else getattr(cfg, name, None)
        if value is None:
            raise ValueError(f"export_onnx: pass {name}= (the model has no config.{name})")
        return int(value)

    L, C, F = pick(lookback, "lookback"), pick(channels, "channels"), pick(n_time_features, "n_time_features")
    if batch_size < 2:   # torch.export specialises size-1 dims, which would fix the batch to 1
        raise ValueError(f"export_onnx: batch_size must be >= 2 for a dynamic batch axis, got {batch_size}")
    g = torch.Generator().manual_seed(0)
    x_enc = torch.randn(batch_size, L, C, generator=g)
    x_mark_enc = torch.rand(batch_size, L, F, generator=g) - 0.5   # timeF features lie in [-0.5, 0.5]
    extras = {}
    for name, t in (extra_inputs or {}).items():
        if name in INPUT_NAMES or name == OUTPUT_NAME:
            raise ValueError(f"export_onnx: extra input name {name!r} clashes with {INPUT_NAMES + (OUTPUT_NAME,)}")
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != batch_size:
            raise ValueError(f"export_onnx: extra input {name!r} must be a tensor with batch dim "
                             f"{batch_size} first, got {getattr(t, 'shape', type(t))}")
        t = t.detach().cpu()
        extras[name] = t.float() if t.is_floating_point() else t
    return (x_enc, x_mark_enc), extras


class _DropRecords(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's messages that say nothing about the user's model: the op registry's "torchvision
    is not installed. Skipping torchvision::nms" (four lines, first export of a process), torch.export's
    own pytree deprecation (FutureWarning "isinstance(treespec, LeafSpec) is deprecated"), onnx_ir's note that
    an empty attribute list (onnxscript's index_put lowering) was typed INTS, torch.export's note that
    D-LoRA's ``routed_gates`` were assigned during the export, and the note that input_names renames the
    already-named batch axis. Anything else still shows."""
    drops = [(logging.getLogger("torch.onnx._internal.exporter._registration"),
              _DropRecords("torchvision is not installed")),
             (logging.getLogger("onnx_ir._convenience"),          # an empty attribute list, typed INTS: right
              _DropRecords("Attribute type is ambiguous because it is an empty sequence"))]
    for log, drop in drops:
        log.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            # D-LoRA's routers hand each LoRA module its gates as an attribute within the same forward
            # (mmts_fast/nn/lora.py): values of the traced call, not state; any other attribute still warns
            warnings.filterwarnings("ignore", message=r"The tensor attributes (?:[\w.]+\.routed_gates(?:, )?)+ "
                                    r"were assigned during export", category=UserWarning)
            yield
    finally:
        for log, drop in drops:
            log.removeFilter(drop)


def _export(wrapper, args, names, out_file, opset, use_dynamo, external_data, extra_axes):
    """``extra_axes``: input name -> {axis: name} of further dynamic axes (the batch axis always is)."""
    common = dict(input_names=list(names), output_names=[OUTPUT_NAME], opset_version=opset)
    axes = {n: {0: "batch", **extra_axes.get(n, {})} for n in names}
    if use_dynamo:
        dims = {}
        shapes = [{i: dims.setdefault(a, torch.export.Dim(a)) for i, a in axes[n].items()} for n in names]
        shapes = shapes[:2] + ([tuple(shapes[2:])] if len(names) > 2 else [])   # torch.export nests the extras
        with _quiet_exporter():
            torch.onnx.export(wrapper, args, str(out_file), dynamo=True, external_data=external_data,
                              dynamic_shapes=tuple(shapes), verbose=False, **common)
    else:   # writes external data by itself only past protobuf's 2 GiB limit
        axes[OUTPUT_NAME] = {0: "batch"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # "legacy exporter": we know, see the log
            torch.onnx.export(wrapper, args, str(out_file), dynamo=False, dynamic_axes=axes, **common)
        _restore_unused_inputs(out_file, names, args, axes)


def _restore_unused_inputs(out_file, names, args, axes) -> None:
    """The TorchScript exporter leaves out inputs the graph never reads (LeMoLE's ``x_mark_enc``); put them
    back in their place, with the example's dtype and the same dynamic axes, so that the file takes the same
    inputs whichever exporter wrote it (ONNX allows an input no node consumes; ONNX Runtime accepts its feed)."""
    import onnx
    from onnx import helper

    if not out_file.is_file():
        return
    m = onnx.load(str(out_file), load_external_data=False)
    present = {i.name: i for i in m.graph.input}
    if all(n in present for n in names):
        return
    inputs = []
    for n, t in zip(names, args):
        if n in present:
            inputs.append(present.pop(n))
            continue
        shape = [axes[n].get(d, size) for d, size in enumerate(t.shape)]
        elem = helper.np_dtype_to_tensor_dtype(t.detach().cpu().numpy().dtype)
        inputs.append(helper.make_tensor_value_info(n, elem, shape))
    inputs += present.values()   # anything else the exporter lists (initialisers kept as inputs), after ours
    del m.graph.input[:]
    m.graph.input.extend(inputs)
    onnx.save(m, str(out_file))


def export_onnx(model: nn.Module, path, *, lookback: Optional[int] = None, channels: Optional[int] = None,
                n_time_features: Optional[int] = None, batch_size: int = 2, opset: int = 18,
                extra_inputs: Optional[Mapping[str, Tensor]] = None) -> Path:
    """Export a forecasting model ``model(x_enc, x_mark_enc, **extra_inputs) -> [B, H, C]`` to ONNX.

    Args:
        model: a ``ForecastModel`` (or any module with that forward); it is left as found
            (training flag, device and dtypes are restored).
        path: the ``.onnx`` file to write; written atomically (a failed export leaves an existing
            file untouched and no partial file behind). Parent folders are created.
        lookback, channels, n_time_features: the L, C and F of the example inputs; default
            ``model.config.lookback`` / ``.channels`` / ``.n_time_features``.
        batch_size: batch of the example inputs (>= 2; the batch axis is dynamic in the graph).
        opset: ONNX opset of the default domain.
        extra_inputs: name -> example tensor for extra keyword inputs of ``forward``, first put in the
            graph's batch-first form by ``model.export_inputs`` (LeMoLE's ``dynamic_table`` +
            ``dynamic_index`` become ``dynamic_emb``); they become graph inputs after ``x_enc``,
            ``x_mark_enc``, in this order, with a dynamic batch axis, and the further dynamic axes the
            model names in ``export_dynamic_axes`` (MoME: the text length of ``text_hidden`` and ``text_mask``).

    The model runs once eagerly on the example inputs first, so that its own input errors are raised
    before any exporter runs; the file written is checked with :func:`check_graph` (a ValueError, and
    no file, if it breaks the contract).

    Returns:
        The path written. Which exporter was used (``dynamo``, else the TorchScript fallback) is
        logged at INFO level on the ``mmts_fast.export.onnx`` logger (the fallback's reason at WARNING).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, extras = _example_inputs(model, lookback, channels, n_time_features, batch_size,
                                   _graph_form(model, extra_inputs))
    args = (*args, *extras.values())
    names = (*INPUT_NAMES, *extras)
    extra_axes = {n: a for n, a in getattr(model, "export_dynamic_axes", {}).items() if n in extras}
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    external_data = n_bytes > _EMBED_LIMIT
    # Export into a private folder next to the target, under the final file name (so that an
    # external data file, if any, is referenced by its final name), then move the files over.
    with _reference_mode(model):
        wrapper = _Positional(model, tuple(extras)).eval()
        wrapper(*args)   # the model's own input errors (missing or misshapen inputs) now, before any exporter
        tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            out_file = tmp_dir / path.name
            start = time.perf_counter()
            try:
                _export(wrapper, args, names, out_file, opset, True, external_data, extra_axes)
                exporter = "dynamo"
            except Exception as err:   # noqa: BLE001 - any dynamo failure: try the other exporter
                first = (str(err).strip().splitlines() or [""])[0][:300]
                logger.warning("dynamo ONNX export of %s failed (%s: %s); falling back to the "
                               "TorchScript exporter", type(model).__name__, type(err).__name__, first)
                logger.debug("the dynamo exporter's error in full", exc_info=err)
                for leftover in tmp_dir.iterdir():
                    leftover.unlink()
                _export(wrapper, args, names, out_file, opset, False, external_data, extra_axes)
                exporter = "torchscript"
            seconds = time.perf_counter() - start
            if not out_file.is_file():
                raise RuntimeError(f"export_onnx: the {exporter} exporter wrote no file")
            try:   # the file must keep the package's contract whichever exporter wrote it
                check_graph(out_file)
            except ValueError as e:
                raise ValueError(f"export_onnx: the {exporter} exporter wrote a graph that breaks the contract "
                                 f"({str(e).replace(str(out_file), path.name)}); nothing was written to {path}") from e
            # The .onnx file goes last: it is the commit point, its data files are in place before it.
            for f in sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name):
                os.replace(f, path.parent / f.name)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("exported %s to %s with the %s exporter in %.2f s", type(model).__name__, path, exporter, seconds)
    return path


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def _non_standard_ops(graph) -> list[str]:
    """``domain::op_type`` of every node (also in subgraphs) outside the standard ONNX domain."""
    import onnx

    found = []
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            found.append(f"{node.domain}::{node.op_type}")
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                found += _non_standard_ops(sub)
    return found


def check_graph(path) -> "onnx.ModelProto":  # noqa: F821
    """``onnx.checker`` plus this package's contract: inputs start with ``x_enc``, ``x_mark_enc``
    (rank 3), the single output is ``y`` (rank 3), batch axes are symbolic, only standard ops.
    Returns the loaded model; raises ``ValueError`` on any violation."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    inputs, outputs = list(graph.input), list(graph.output)
    names = [i.name for i in inputs]
    if names[:2] != list(INPUT_NAMES):
        raise ValueError(f"{path}: graph inputs are {names}, expected {list(INPUT_NAMES)} first")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        raise ValueError(f"{path}: graph outputs are {[o.name for o in outputs]}, expected [{OUTPUT_NAME!r}]")
    for v in (*inputs[:2], outputs[0]):
        dims = v.type.tensor_type.shape.dim
        if len(dims) != 3:
            raise ValueError(f"{path}: {v.name} has rank {len(dims)}, expected 3")
    for v in (*inputs, outputs[0]):
        if v.type.tensor_type.shape.dim[0].HasField("dim_value"):
            raise ValueError(f"{path}: {v.name} has a fixed batch size "
                             f"{v.type.tensor_type.shape.dim[0].dim_value}, expected a dynamic axis")
    bad = _non_standard_ops(graph)
    if bad:
        raise ValueError(f"{path}: non-standard ONNX ops in the graph: {sorted(set(bad))}")
    return proto


_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def _ort_feed(name: str, t: Optional[Tensor], arg, x_enc: Tensor, model: nn.Module) -> Tensor:
    """What PyTorch accepts, as ONNX Runtime needs it for graph input ``arg`` (a session NodeArg)."""
    B, L = x_enc.shape[:2]
    if t is None:   # x_mark_enc=None for a model that does not read it: zeros of the graph's width
        width = arg.shape[2] if len(arg.shape) == 3 else None
        width = width if isinstance(width, int) else getattr(getattr(model, "config", None), "n_time_features", None)
        if not isinstance(width, int):
            raise ValueError(f"verify_onnx: the graph takes {name} [B, L, F] but x_mark_enc is None and the "
                             f"width F is unknown; pass x_mark_enc")
        return torch.zeros(B, L, width)
    want = _ORT_TYPES.get(arg.type)
    if want is not None and t.dtype != want and not t.is_floating_point() and not want.is_floating_point:
        t = t.to(want)                                   # int 0/1 mask -> bool, int32 ids -> int64
    if name not in INPUT_NAMES and 0 < t.dim() + 1 == len(arg.shape):
        t = t[None]                                      # an unbatched input the model broadcasts: [d] -> [1, d]
    if name not in INPUT_NAMES and t.dim() == len(arg.shape) and t.shape[0] == 1 and B != 1:
        t = t.expand(B, *t.shape[1:])                    # batch 1 the model broadcasts -> the batch
    return t.contiguous()


def verify_onnx(model: nn.Module, path, x_enc: Tensor, x_mark_enc: Optional[Tensor], *, atol: float = 1e-4,
                providers: Optional[Sequence] = None, extra_inputs: Optional[Mapping[str, Tensor]] = None
                ) -> float:
    """Run the exported file in ONNX Runtime on one batch and compare with the PyTorch model.

    The reference is the model in eval mode, on CPU, fp32, torch backend (the model is left as found).
    ONNX Runtime uses the CUDA provider (TF32 off) when the inputs are on CUDA and it is available,
    else the CPU provider; ``providers`` overrides that choice.

    The inputs are those the PyTorch model takes; ONNX Runtime gets them in the graph's form:
    ``extra_inputs`` through ``model.export_inputs`` (LeMoLE's table form), ``x_mark_enc=None`` (a
    model that does not need it) as zeros ``[B, L, F]``, integer masks as bool, int32 ids as int64,
    and an extra input the model broadcasts over the batch (LeMoLE ``static_emb`` ``[d]`` or ``[1, d]``)
    expanded to ``[B, ...]``.

    Returns the max absolute error. Raises ``ValueError`` if the graph breaks the contract
    (see :func:`check_graph`) or the output shape is wrong, ``AssertionError`` if the error > ``atol``.
    """
    import onnxruntime as ort

    check_graph(path)
    extra_inputs = _graph_form(model, extra_inputs)
    if providers is None:
        on_cuda = x_enc.is_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ([("CUDAExecutionProvider", {"use_tf32": 0})] if on_cuda else []) + ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=list(providers))

    def host(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.detach().cpu()
        return t.float() if t.is_floating_point() else t

    feeds = {"x_enc": host(x_enc), "x_mark_enc": host(x_mark_enc), **{k: host(v) for k, v in extra_inputs.items()}}
    graph_inputs = {i.name: i for i in session.get_inputs()}
    if set(feeds) != set(graph_inputs):
        raise ValueError(f"{path}: the graph takes inputs {sorted(graph_inputs)}, got {sorted(feeds)}")
    with _reference_mode(model):
        ref = model(feeds["x_enc"], feeds["x_mark_enc"], **{k: feeds[k] for k in extra_inputs})
    ort_feeds = {k: _ort_feed(k, v, graph_inputs[k], feeds["x_enc"], model).numpy() for k, v in feeds.items()}
    (out,) = session.run([OUTPUT_NAME], ort_feeds)
    out = torch.from_numpy(out)
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"{path}: ONNX output {OUTPUT_NAME!r} has shape {tuple(out.shape)}, "
                         f"the PyTorch model gives {tuple(ref.shape)}")
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    if not err <= atol:   # also catches NaN
        raise AssertionError(f"{path}: ONNX Runtime ({session.get_providers()[0]}) differs from PyTorch by "
                             f"max abs {err:.3e} > atol {atol:.1e} on a batch of {tuple(x_enc.shape)}")
    return err


__all__ = ["check_graph", "export_onnx", "verify_onnx"]
