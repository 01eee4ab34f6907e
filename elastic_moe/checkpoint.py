"""Our checkpoint format: a folder written atomically, verified on load.

    CKPT/
      model.safetensors   every parameter and persistent buffer of ElasticMoE (router bias and expert order too)
      config.json         {"format": "elastic-moe/1", "model": {...ModelConfig...}, "sha256": {file: hex}, ...meta}
      tokenizer/          optional: the Hugging Face tokenizer files trained with the run
      ...                 optional extra files written by the caller (optimizer and data state of a training run)

A run directory keeps its checkpoints as RUN_DIR/checkpoints/step_00000100/; anywhere a checkpoint is expected,
a run directory means its latest complete checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elastic_moe.atomic import atomic_dir, default_mode
from elastic_moe.config import ModelConfig
from elastic_moe.errors import UserError
from elastic_moe.model import ElasticMoE

if TYPE_CHECKING:
    from elastic_moe.tokenizer import Tokenizer

FORMAT = "elastic-moe/1"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"  # a training run's optimizer, step and RNG state, beside the weights


class CorruptCheckpoint(UserError):
    """A checkpoint folder whose files are missing, unreadable or fail their checksums."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def torch_state(obj) -> Callable[[Path], None]:
    """A writer for `save_checkpoint(extra=...)`: `torch.save(obj)`, whose failed write (a full disk) torch reports
    as a RuntimeError from its zip writer, made an OSError naming the file."""
    def write(path: Path) -> None:
        try:
            torch.save(obj, path)
        except RuntimeError as e:
            if "inline_container" not in str(e):
                raise
            raise OSError(errno.EIO, f"torch.save failed ({str(e).splitlines()[0]}): is the disk full?",
                          str(path)) from None

    return write


def save_checkpoint(path: str | Path, model: ElasticMoE, meta: dict | None = None, tokenizer_dir: str | Path | None = None,
                    extra: dict[str, Callable[[Path], None]] | None = None, force: bool = True) -> Path:
    """Write `model` (and optional tokenizer folder and extra files, each written by `extra[name](path)`)."""
    path = Path(path)
    try:
        ctx = atomic_dir(path, force=force)
        tmp = ctx.__enter__()
    except FileExistsError as e:
        raise UserError(str(e)) from None
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            default_mode(tmp / WEIGHTS)
            sums = {WEIGHTS: sha256_file(tmp / WEIGHTS)}
            for name, write in (extra or {}).items():
                write(tmp / name)
                if (tmp / name).is_file():
                    sums[name] = sha256_file(tmp / name)
            if tokenizer_dir is not None:
                shutil.copytree(tokenizer_dir, tmp / "tokenizer")
            cfg = {"format": FORMAT, "model": model.cfg.to_dict(), "sha256": sums, **(meta or {})}
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        except (OSError, SafetensorError) as e:  # a full disk (safetensors raises its own error for it)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            raise OSError(getattr(e, "errno", None) or errno.EIO, f"cannot write the checkpoint ({why})",
                          str(path)) from None
    except BaseException as e:
        ctx.__exit__(type(e), e, e.__traceback__)
        raise
    ctx.__exit__(None, None, None)
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory's latest checkpoint."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / WEIGHTS).exists():
        return path
    ckdir = path / "checkpoints"
    if ckdir.is_dir():
        steps = sorted(p for p in ckdir.iterdir() if p.name.startswith("step_") and (p / "config.json").is_file())
        if steps:
            return steps[-1]
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    raise UserError(f"{path} is neither a checkpoint (config.json + {WEIGHTS}) nor a run directory with checkpoints")


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {path} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"checkpoint {path}: config.json is corrupt ({e})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str) and fmt.startswith("elastic-moe/") and fmt != FORMAT:
        raise UserError(f"checkpoint {path} has format {fmt}, this version of elastic-moe reads {FORMAT} (was it "
                        "written by another version?)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        hint = ("; it is a Hugging Face folder: convert it with `elastic-moe import-hf`"
                if isinstance(meta, dict) and "model_type" in meta else "")
        raise UserError(f"checkpoint {path}: not an elastic-moe checkpoint "
                        f"(format {meta.get('format') if isinstance(meta, dict) else None!r}){hint}")
    sums = meta.get("sha256")
    if not isinstance(meta.get("model"), dict) or not (
            isinstance(sums, dict) and WEIGHTS in sums and all(isinstance(v, str) for v in sums.values())):
        raise CorruptCheckpoint(f"checkpoint {path}: config.json is corrupt (its model config or checksums are missing or "
                        "malformed)")
    return meta


def verify(path: str | Path, meta: dict | None = None) -> None:
    path = Path(path)
    meta = meta or read_meta(path)
    for name, digest in meta.get("sha256", {}).items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: checksum mismatch on {name}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", expect: ModelConfig | None = None
                    ) -> tuple[ElasticMoE, dict]:
    """Load and verify a checkpoint (or a run directory's latest). With `expect`, refuse a different model config."""
    path = find_checkpoint(path)
    meta = read_meta(path)
    verify(path, meta)
    cfg = ModelConfig.from_dict(meta["model"])
    if expect is not None and cfg != expect:
        diff = [k for k, v in expect.to_dict().items() if meta["model"].get(k) != v]
        raise UserError(f"checkpoint {path} was made with an incompatible model config (differs in {', '.join(diff)})")
    try:
        tensors = load_file(str(path / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt: {WEIGHTS} unreadable ({e})") from None
    with torch.device(device):
        model = ElasticMoE(cfg)
    load_state(model, tensors, str(path))
    meta["path"] = str(path)
    return model, meta


def load_policy(path: str | Path) -> tuple[ElasticMoE, Tokenizer, dict]:
    """A checkpoint and the tokenizer saved with it (post-training needs the run's tokenizer)."""
    from elastic_moe.tokenizer import Tokenizer

    model, meta = load_checkpoint(path, "cpu")
    tok_dir = Path(meta["path"]) / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        raise UserError(f"checkpoint {meta['path']} has no tokenizer/: RL and SFT need the run's tokenizer")
    return model, Tokenizer.load(tok_dir), meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict,
                         load: Callable[[dict], None] | None = None) -> None:
    """A checkpoint's optimizer state (moments, step counts) under the settings configured now (lr, betas, eps,
    weight decay): torch's `load_state_dict` brings the saved settings back as well, which would silently undo a
    setting changed for the resumed session. `load`: how to load (default `optimizer.load_state_dict`)."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    (load or optimizer.load_state_dict)(state)
    for g, s in zip(optimizer.param_groups, settings):
        g.update(s)


def load_state(model: ElasticMoE, tensors: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    if "layer_order_set" not in tensors and "layer_order" in tensors:  # checkpoints from before the flag existed
        order = tensors["layer_order"]
        tensors = {**tensors, "layer_order_set": torch.tensor(not torch.equal(order, torch.arange(len(order))))}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"{where}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise UserError(f"{where}: {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(tensors)
