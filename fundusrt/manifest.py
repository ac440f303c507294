"""The model package manifest: the only thing the runtime reads besides the files it names.

A package is a directory holding `manifest.json`, one ONNX (or engine) file per component and the
tokenizer. Component I/O contract (names are stored per component; these are the defaults the
exporter writes):

- vision:    pixel_values (num_tiles, 3, S, S) float32 -> vision_features (num_tiles, T_in, C_in)
- connector: vision_features -> image_embeds (num_tiles, tokens_per_tile, hidden)
- embed:     input_ids (batch, seq) int64 -> inputs_embeds (batch, seq, hidden)
- decoder:   inputs_embeds (batch, seq, hidden), attention_mask (batch, past+seq) int64,
             position_ids (batch, seq) int64, past_key_values.%d.key/value (batch, kv_heads, past, head_dim)
             -> logits (batch, 1, vocab) for the last position, present.%d.key/value (batch, kv_heads, past+seq, head_dim)
             With `decoder.kv_cache == "shared"` (onnxruntime-genai decoders: GroupQueryAttention), position_ids
             is absent, logits cover every new position, and past and present are one (batch, kv_heads,
             max_seq_len, head_dim) buffer written in place; attention_mask (batch, past+seq) says how much is valid.

`extra` holds optional records; the one a package author sets by hand (or `fundusrt export --answers-mcq`):

- `extra["mcq_prompt"]`: the multiple-choice prompt the model was trained to answer (only "vlmevalkit", the
  VLMEvalKit prompt of `fundusrt.bench.metrics.mcq_prompt`, is known). `fundusrt bench` runs MCQ sets only
  for packages that declare it; the others are measured on what they were trained to answer (their protocol).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundusrt.config import TilingConfig, from_dict

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
COMPONENTS = ("vision", "connector", "embed", "decoder")
# "concat": presents are past + new (a new buffer each step); "shared": one max_seq_len buffer updated in place.
KV_CACHE_LAYOUTS = ("concat", "shared")
# extra key: the MCQ prompt format the package answers (see the module docstring)
MCQ_PROMPT_KEY = "mcq_prompt"
MCQ_PROMPTS = ("vlmevalkit",)


class PackageError(Exception):
    """A model package is missing, malformed or does not match its manifest."""


@dataclass
class TensorSpec:
    """One input or output: name, element type and shape (ints, or strings for dynamic axes)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass
class ComponentSpec:
    """A component file with its sha256 and I/O.

    `data_files` maps ONNX external-data files (weights of components over the 2 GiB protobuf limit)
    to their sha256; they must sit beside `file`.
    """

    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data_files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ComponentSpec:
        return cls(
            file=d["file"],
            sha256=d["sha256"],
            inputs=[from_dict(TensorSpec, t) for t in d["inputs"]],
            outputs=[from_dict(TensorSpec, t) for t in d["outputs"]],
            data_files=dict(d.get("data_files", {})),
        )


@dataclass
class DecoderSpec:
    """What the runtime needs to own the KV cache of the decoder."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_seq_len: int
    past_key: str = "past_key_values.%d.key"
    past_value: str = "past_key_values.%d.value"
    present_key: str = "present.%d.key"
    present_value: str = "present.%d.value"
    kv_cache: str = "concat"

    def __post_init__(self) -> None:
        if self.kv_cache not in KV_CACHE_LAYOUTS:
            raise PackageError(f"decoder.kv_cache must be one of {KV_CACHE_LAYOUTS}, got {self.kv_cache!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise PackageError(f"decoder.{name} must be positive, got {getattr(self, name)}")


@dataclass
class PromptSpec:
    """Chat template and special tokens, in a form that needs no template engine.

    A single-turn prompt renders as
    `bos? + system_template.format(system=system_message) + user_template.format(content=...) + assistant_prefix`,
    where each `image_placeholder` in the user content becomes
    `image_start + image_token * n + image_end` (n = image tokens of that image), inserted as ids.
    """

    system_message: str
    system_template: str
    user_template: str
    assistant_prefix: str
    image_token: str
    image_token_id: int
    tokens_per_tile: int
    stop_token_ids: list[int]
    image_placeholder: str = "<image>"
    image_start: str = ""
    image_end: str = ""
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # "flat": tile features concatenated in tile order; "anyres_unpad": LLaVA-NeXT assembly.
    image_layout: str = "flat"

    def __post_init__(self) -> None:
        if "{content}" not in self.user_template:
            raise PackageError("prompt.user_template must contain {content}")
        if self.tokens_per_tile <= 0:
            raise PackageError(f"prompt.tokens_per_tile must be positive, got {self.tokens_per_tile}")
        if not self.stop_token_ids:
            raise PackageError("prompt.stop_token_ids is empty: generation could never stop early")


@dataclass
class Manifest:
    """The model package manifest (see the module docstring for the component contract)."""

    name: str
    family: str
    components: dict[str, ComponentSpec]
    decoder: DecoderSpec
    preprocessing: TilingConfig
    prompt: PromptSpec
    tokenizer: str = "tokenizer.json"
    tokenizer_sha256: str = ""
    precision: str = "fp32"
    default_questions: list[str] = field(default_factory=list)
    tool_versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(
                f"manifest format_version {version!r} is not supported (this fundusrt reads {FORMAT_VERSION}); "
                "re-export the package with this version of fundusrt"
            )
        missing = [c for c in COMPONENTS if c not in d.get("components", {})]
        if missing:
            raise PackageError(f"manifest lacks components {missing}; a package needs {list(COMPONENTS)}")
        try:
            return cls(
                name=d["name"],
                family=d["family"],
                components={k: ComponentSpec.from_dict(v) for k, v in d["components"].items()},
                decoder=from_dict(DecoderSpec, d["decoder"]),
                preprocessing=from_dict(TilingConfig, d["preprocessing"]),
                prompt=from_dict(PromptSpec, d["prompt"]),
                **{k: d[k] for k in ("tokenizer", "tokenizer_sha256", "precision", "default_questions",
                                     "tool_versions", "source", "extra", "format_version") if k in d},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"manifest is malformed: {exc}") from exc

    def save(self, package_dir: str | Path) -> Path:
        """Write manifest.json atomically into `package_dir`."""
        path = Path(package_dir) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, package_dir: str | Path) -> Manifest:
        """Read and validate `package_dir/manifest.json` (does not hash the files: see `verify`)."""
        path = Path(package_dir) / MANIFEST_NAME
        if not path.is_file():
            raise PackageError(f"{package_dir} is not a model package: {MANIFEST_NAME} not found. "
                               "Create one with `fundusrt export CHECKPOINT --out DIR`.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PackageError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def _expected_files(self) -> dict[str, str]:
        expected = {spec.file: spec.sha256 for spec in self.components.values()}
        for spec in self.components.values():
            expected.update(spec.data_files)
        expected[self.tokenizer] = self.tokenizer_sha256
        return expected

    def verify(self, package_dir: str | Path) -> None:
        """Check every file the manifest names exists and matches its sha256; raise PackageError listing all mismatches."""
        root = Path(package_dir)
        problems = []
        for rel, digest in self._expected_files().items():
            path = root / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif sha256_file(path) != digest:
                problems.append(f"{rel}: sha256 does not match the manifest (file changed or corrupt)")
        if problems:
            raise PackageError(f"package {root} failed its integrity check: " + "; ".join(problems)
                               + ". Re-export or re-copy the package.")

    def verify_stamped(self, package_dir: str | Path, stamp_dir: Path | None = None, force: bool = False) -> bool:
        """`verify`, skipped when a stamp shows no file changed since the last full check; True when it hashed.

        A package of gigabytes is hashed once; the stamp (in `stamp_dir`, default $FUNDUSRT_CACHE/verified)
        records each file's size, mtime, ctime, inode and device, keyed by the package path and the manifest's
        own hash. Any write to a file changes its ctime (which no user call can set back), a replaced file has
        another inode, so a later change forces a full check. What this trusts: the file system's metadata
        and the cache folder (whoever can write there can skip the check, as whoever can write the package
        can rewrite its manifest). A stamp that cannot be written only costs the next load a full check.
        `force` hashes whatever the stamp says (and renews it).
        """
        root = Path(package_dir).resolve()
        manifest_sha = sha256_file(root / MANIFEST_NAME)
        stamp = (stamp_dir or cache_root() / "verified") / hashlib.sha256(
            f"{root}\0{manifest_sha}".encode()).hexdigest()[:32]
        identity = {rel: _file_identity(root / rel) for rel in self._expected_files()}
        try:
            if not force and json.loads(stamp.read_text()) == identity:
                return False
        except (OSError, ValueError):
            pass
        self.verify(root)
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(stamp, json.dumps(identity))
        except OSError:
            pass
        return True


def _file_identity(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cache_root() -> Path:
    """$FUNDUSRT_CACHE, else ~/.cache/fundusrt: where fundusrt keeps what it can rebuild (kernels, stamps)."""
    return Path(os.environ.get("FUNDUSRT_CACHE") or Path.home() / ".cache" / "fundusrt")


def publish_package(staging: Path, out: Path) -> Path:
    """Move a fully written package from its staging folder to `out` (replacing what was there).

    mkdtemp/mkstemp create owner-only modes; a package is a shared, read-only artifact, so the folder
    and its files get ordinary permissions first.
    """
    staging.chmod(0o755)
    for file in staging.iterdir():
        file.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a fsync'd temporary file in the same directory and an atomic rename.

    The file gets the usual 0644 permissions (mkstemp alone would leave it owner-only).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
