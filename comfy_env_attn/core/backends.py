"""The attention backends this tool knows: names, packages and what their kernels support.

Pure data. The dispatcher imports this module too, so it must stay standard-library only.
"""

from __future__ import annotations

import re

from comfy_env_attn.core.errors import UsageError
from comfy_env_attn.core.records import dataclass

TYPE_CHECKING = False  # the dispatcher loads this module: no typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterable

# Head dims real models send (FACTS.md section 7): SD 1.5 40/80/160, SDXL and SD3 64,
# Lumina 2 96, Flux/Wan/Hunyuan 128, AuraFlow 256.
MODEL_HEAD_DIMS = (40, 64, 80, 96, 128, 160, 256)
ALL_DTYPES = frozenset({"float16", "bfloat16", "float32"})
HALF = frozenset({"float16", "bfloat16"})

# The plugins whose code ships with comfy-env-attn (runtime/<name>.py): the fingerprint's
# adapters_sha256 covers their code, so a lock trusts them without a distribution of their
# own. No other backend can claim that.
SHIPPED_PLUGINS = ("taylor",)

# The call variants verification proves one by one; a call needs "plain" and each variant it
# uses to have passed at its head dim and dtype. A packed (varlen) call is its own kernel:
# it needs "varlen" and, for each feature it uses, that feature proven packed ("varlen_causal"
# ...), not the dense proof of it. A mask together with causal reaches no backend as such:
# the dispatcher folds the triangle into the mask first (runtime.adapters.merge_causal).
VARIANTS = ("plain", "causal", "scale", "cross", "causal_cross", "mask_bool", "mask_additive",
            "gqa", "varlen", "varlen_causal", "varlen_scale", "varlen_cross", "varlen_gqa",
            "varlen_causal_cross")
# the features a varlen call may use, each proven packed; causal_cross is the pair whose
# answer depends on how the triangle is aligned, proven as a pair
_PACKED = ("causal", "scale", "cross", "gqa", "causal_cross")


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernel takes, as its adapter calls it. A claim, not a proof:
    verification checks each claimed (variant, head dim, dtype) and the lock records what
    passed."""

    dtypes: frozenset[str]
    head_dims: tuple[int, ...]
    masks: frozenset[str] = frozenset()  # "bool", "additive"
    causal: bool = True
    # causal with key/value length != query length: SDPA aligns the triangle top-left,
    # flash-attn and sage bottom-right, so only backends that align it like SDPA claim it
    # (and verification proves the pair: "causal_cross", "varlen_causal_cross")
    causal_cross: bool = False
    scale: bool = True
    cross: bool = True  # key/value length different from the query's
    gqa: bool = True  # fewer key/value heads than query heads
    varlen: bool = False

    def variants(self) -> tuple[str, ...]:
        claims = {"plain": True, "causal": self.causal, "scale": self.scale,
                  "cross": self.cross, "mask_bool": "bool" in self.masks,
                  "causal_cross": self.causal and self.cross and self.causal_cross,
                  "mask_additive": "additive" in self.masks, "gqa": self.gqa,
                  "varlen": self.varlen}
        claims.update({f"varlen_{f}": self.varlen and claims[f] for f in _PACKED})
        return tuple(v for v in VARIANTS if claims[v])


@dataclass(frozen=True)
class Call:
    """One kind of attention call, described without torch: what the capability rules read."""

    dtype: str
    head_dim: int
    q_len: int
    kv_len: int
    q_heads: int = 1
    kv_heads: int = 1
    mask: str | None = None  # None, "bool" or "additive"
    causal: bool = False
    scale: bool = False  # a scale other than 1/sqrt(head dim) was given
    device: str = "cuda"
    capability: tuple[int, int] | None = None  # the GPU's, when device is cuda
    varlen: bool = False  # packed sequences ([T, H, D] with cumulative lengths)
    # varlen: some sequence's key/value length differs from its query length (q_len and
    # kv_len are the longest ones, which may still be equal)
    lengths_differ: bool = False

    @property
    def cross(self) -> bool:
        """Keys and values of another length than the queries (in some sequence)."""
        return self.kv_len != self.q_len or self.lengths_differ

    def variants(self) -> tuple[str, ...]:
        """The variants this call uses, "plain" (or "varlen") first."""
        used = {"causal": self.causal, "scale": self.scale, "cross": self.cross,
                "gqa": self.kv_heads != self.q_heads, "causal_cross": self.causal and self.cross}
        if self.varlen:
            return ("varlen", *(f"varlen_{f}" for f in _PACKED if used[f]))
        out = ["plain", *(f for f in ("causal", "scale", "cross", "causal_cross") if used[f])]
        if self.mask:
            out.append(f"mask_{self.mask}")
        if used["gqa"]:
            out.append("gqa")
        return tuple(out)


@dataclass(frozen=True)
class Backend:
    """One attention backend: its distribution, import name, kernel and what it can do."""
    name: str
    dist: str  # normalized distribution name; "" for sdpa
    title: str
    import_name: str
    kernel: str
    quantized: bool
    caps: Capabilities
    # Compute capabilities the kernels run on, as (major, minor) ranges: min inclusive,
    # max inclusive. None means no GPU rule (sdpa).
    min_sm: tuple[int, int] | None
    max_sm: tuple[int, int] | None = None
    excluded_sm: tuple[tuple[int, int], ...] = ()
    min_cuda: tuple[int, int] | None = None
    needs_torch_abi: bool = True  # compiled against libtorch: same torch major.minor
    approximate: bool = False  # auto uses it only when asked (set_backend(approximate=True))
    # accuracy limits against float32 SDPA, for every dtype; None: by kind (thresholds())
    limits: tuple[float, float] | None = None  # (max abs error, min cosine)
    # all its code ships with comfy-env-attn, no outside package: the lock's adapters_sha256
    # covers it (one of SHIPPED_PLUGINS)
    shipped: bool = False
    # another kernel of the backend named here, from the same distribution: planned,
    # installed and fingerprinted as that backend's package, verified and locked on its own
    # (primary(), variants())
    variant_of: str = ""
    # quantized in Q.K^T only, with P.V in fp16 and fp32 accumulation: what safe mode
    # allows among quantized kernels (fp8 P.V, as sageattn runs on sm89/90/120, and fp4 are
    # the ones that turn some models' images black or noisy)
    fp16_pv: bool = False

    def thresholds(self) -> dict[str, dict[str, float]]:
        """Per dtype: the largest max abs error and smallest cosine similarity against
        float32 SDPA that verification accepts."""
        if self.limits is not None:
            return {dt: {"max_abs": self.limits[0], "min_cosine": self.limits[1]}
                    for dt in EXACT_LIMITS}
        if self.name == "sage3":
            return FP4_LIMITS
        return QUANTIZED_LIMITS if self.quantized else EXACT_LIMITS

    def runs_on_sm(self, cc: tuple[int, int]) -> bool:
        if self.min_sm is None:
            return True
        return not (cc < self.min_sm or (self.max_sm is not None and cc > self.max_sm)
                    or cc in self.excluded_sm)

    def support_text(self) -> str:
        if self.min_sm is None:
            return "any device"
        lo = f"{self.min_sm[0]}.{self.min_sm[1]}"
        text = f"sm {lo}+" if self.max_sm is None else \
            f"sm {lo} to {self.max_sm[0]}.{self.max_sm[1]}"
        if self.excluded_sm:
            text += " except " + ", ".join(f"{a}.{c}" for a, c in self.excluded_sm)
        return text

    def not_supported_reasons(self, call: Call, caps: Capabilities | None = None) -> list[str]:
        """Every reason this backend cannot take the call (empty: it claims it). `caps`
        overrides the declared capabilities (an adapter may learn more once loaded, e.g.
        whether the installed sageattn takes a mask)."""
        c = caps or self.caps
        out = []
        if call.device == "cuda" and call.capability is not None and \
                not self.runs_on_sm(call.capability):
            out.append(f"{self.title} runs on {self.support_text()}, this GPU is sm "
                       f"{call.capability[0]}.{call.capability[1]}")
        if call.dtype not in c.dtypes:
            out.append(f"{self.title} takes {'/'.join(sorted(c.dtypes))}, the call is "
                       f"{call.dtype}")
        if call.head_dim not in c.head_dims:
            out.append(f"{self.title} claims head dims {', '.join(map(str, c.head_dims))}; "
                       f"the call has {call.head_dim}")
        if call.mask and call.mask not in c.masks:
            out.append(f"{self.title} takes no {call.mask} mask" if c.masks else
                       f"{self.title} takes no attention mask")
        if call.causal and not c.causal:
            out.append(f"{self.title} has no causal mode")
        if call.causal and call.cross and not c.causal_cross:
            lengths = "a sequence's key/value length != its query length" \
                if call.lengths_differ else \
                f"key/value length {call.kv_len} != query length {call.q_len}"
            out.append(f"{self.title} aligns a causal mask bottom-right; with {lengths} "
                       "that is not SDPA's (top-left) answer")
        if call.scale and not c.scale:
            out.append(f"{self.title} takes no custom scale")
        if call.cross and not c.cross:
            out.append(f"{self.title} needs key/value length = query length")
        if call.varlen and not c.varlen:
            out.append(f"{self.title} takes no packed (varlen) sequences")
        if call.kv_heads != call.q_heads and not c.gqa:
            out.append(f"{self.title} needs as many key/value heads as query heads "
                       f"({call.kv_heads} != {call.q_heads})")
        return out


# Against float32 SDPA on random normal inputs. Exact kernels land within bf16 rounding of the
# reference (FA4: 5e-4 to 1e-3 on an H100); SageAttention 2 reaches cosine 0.9993, max error
# 0.005 to 0.02 (FACTS.md section 6). A backend producing black images (NaN, zeros,
# garbage) misses these by orders of magnitude.
EXACT_LIMITS = {"float32": {"max_abs": 1e-3, "min_cosine": 0.99999},
                "float16": {"max_abs": 5e-3, "min_cosine": 0.9999},
                "bfloat16": {"max_abs": 3e-2, "min_cosine": 0.999}}
QUANTIZED_LIMITS = {dt: {"max_abs": 0.1, "min_cosine": 0.99} for dt in EXACT_LIMITS}
FP4_LIMITS = {dt: {"max_abs": 0.3, "min_cosine": 0.97} for dt in EXACT_LIMITS}

_UP_TO_128 = tuple(d for d in MODEL_HEAD_DIMS if d <= 128)

BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sdpa", "", "PyTorch SDPA", "torch.nn.functional",
                "scaled_dot_product_attention", quantized=False, min_sm=None,
                caps=Capabilities(ALL_DTYPES, MODEL_HEAD_DIMS,
                                  masks=frozenset({"bool", "additive"}), causal_cross=True,
                                  varlen=True),
                needs_torch_abi=False),
        # SageAttention 2.x: sm80/86/89/90/120, no sm100 kernels; masks only where the
        # installed sageattn takes attn_mask (the adapter looks).
        Backend("sage", "sageattention", "SageAttention", "sageattention", "sageattn",
                quantized=True, min_sm=(8, 0), excluded_sm=((10, 0), (10, 3)),
                caps=Capabilities(HALF, _UP_TO_128, varlen=True)),
        # SageAttention 2's int8-QK, fp16-PV kernel, fp32 accumulation (what sageattn itself
        # runs on sm80): the safer one where sageattn's fp8 PV (sm89/90/120) renders black
        # or noisy images. Built into _qattn_sm80 for every arch the source builds
        # (sm80/86/89/90a/120a/121a, and 100a since late 2025; verification decides);
        # SageAttention 1.x has no such function. No mask argument, no varlen.
        Backend("sage_fp16", "sageattention", "SageAttention (int8 QK, fp16 PV)",
                "sageattention", "sageattn_qk_int8_pv_fp16_cuda", quantized=True,
                fp16_pv=True, variant_of="sage", min_sm=(8, 0), max_sm=(12, 1),
                excluded_sm=((10, 3), (11, 0)), caps=Capabilities(HALF, _UP_TO_128)),
        Backend("sage3", "sageattn3", "SageAttention3", "sageattn3", "sageattn3_blackwell",
                quantized=True, min_sm=(10, 0), max_sm=(12, 1), excluded_sm=((11, 0),),
                caps=Capabilities(HALF, (64, 128), scale=False, gqa=False), min_cuda=(12, 8)),
        Backend("flash", "flash-attn", "FlashAttention 2", "flash_attn", "flash_attn_func",
                quantized=False, min_sm=(8, 0),
                caps=Capabilities(HALF, MODEL_HEAD_DIMS, varlen=True)),
        Backend("flash3", "flash-attn-3", "FlashAttention 3", "flash_attn_interface",
                "flash_attn_func", quantized=False, min_sm=(9, 0), max_sm=(9, 0),
                caps=Capabilities(HALF, MODEL_HEAD_DIMS)),
        Backend("flash4", "flash-attn-4", "FlashAttention 4", "flash_attn.cute",
                "flash_attn_func", quantized=False, min_sm=(9, 0), max_sm=(10, 3),
                caps=Capabilities(HALF, MODEL_HEAD_DIMS),
                needs_torch_abi=False),
        # xformers' LowerTriangularMask is top-left aligned, like SDPA; a tensor bias is
        # additive (a bool mask becomes one)
        Backend("xformers", "xformers", "xformers", "xformers.ops",
                "memory_efficient_attention", quantized=False, min_sm=(5, 0),
                caps=Capabilities(ALL_DTYPES, MODEL_HEAD_DIMS,
                                  masks=frozenset({"bool", "additive"}), causal_cross=True,
                                  gqa=False, varlen=True)),
    )
}

# The order unverified mode tries (COMFY_ENV_ATTN_UNVERIFIED=1): fastest kernels first on the
# GPUs they run on; each backend's own SM range decides whether it is in.
UNVERIFIED_ORDER = ("flash4", "flash3", "sage", "flash", "xformers", "sage3", "sdpa")


BUILTIN = frozenset(BACKENDS)


def register(backend: Backend) -> None:
    """Add a plugin backend to the registry (runtime.plugins.register_backend calls this)."""
    if backend.name in BUILTIN:
        raise ValueError(f"{backend.name!r} is a built-in backend; choose another name")
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", backend.name):
        raise ValueError(f"backend name {backend.name!r}: use lowercase letters, digits and _")
    BACKENDS[backend.name] = backend


ALIASES: dict[str, str] = {
    "sage2": "sage", "sageattention": "sage", "sageattn": "sage",
    "sage_safe": "sage_fp16", "sage-safe": "sage_fp16", "sage-fp16": "sage_fp16",
    "sage_fp16pv": "sage_fp16", "sage-fp16pv": "sage_fp16",
    "sageattn_qk_int8_pv_fp16_cuda": "sage_fp16",
    "sageattn3": "sage3",
    "flash_attn": "flash", "flash2": "flash", "flash-attn": "flash", "fa2": "flash",
    "fa3": "flash3", "flash_attn_3": "flash3", "flash-attn-3": "flash3",
    "fa4": "flash4", "flash_attn_4": "flash4", "flash-attn-4": "flash4",
    "pytorch": "sdpa", "torch": "sdpa",
}

# Distribution name (normalized) -> the backend that installs it (never a variant).
BY_DIST: dict[str, str] = {b.dist: b.name for b in BACKENDS.values()
                           if b.dist and not b.variant_of}


def primary(name: str) -> str:
    """The backend whose distribution ships `name`'s kernel: itself, or what it is a
    variant of. Plans, installs and fingerprints go by this name, one per distribution."""
    b = BACKENDS.get(name)
    return b.variant_of if b is not None and b.variant_of else name


def primaries(names: Iterable[str]) -> list[str]:
    """The backends whose distributions ship these names' kernels (primary), each once, in
    the order first named: what installs, removes or plans them."""
    return list(dict.fromkeys(primary(n) for n in names))


def not_in_package(name: str, stage: str | None) -> bool:
    """A variant whose verification stopped at import: this build of its package lacks the
    kernel (SageAttention 1.x has no sageattn_qk_int8_pv_fp16_cuda), which is nothing that
    failed."""
    return stage == "import" and primary(name) != name


def variants(name: str) -> list[str]:
    """The variants of a backend: other kernels of its distribution, verified with it."""
    return [b.name for b in BACKENDS.values() if b.variant_of == name != ""]


def lookup(name: str) -> str | None:
    """The backend a name, alias or distribution name means (any case, spaces around it
    ignored); None for one that means none. The one reading of a backend's name: the
    command line, set_backend, the environment variables and the node."""
    key = name.strip().lower()
    if key in BACKENDS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    return BY_DIST.get(key.replace("_", "-"))


def canonical(name: str) -> str:
    """The backend name for a name or alias; UsageError listing the valid names otherwise."""
    found = lookup(name)
    if found is not None:
        return found
    key = name.strip().lower()
    import difflib

    close = difflib.get_close_matches(key, [*BACKENDS, *ALIASES, *BY_DIST], n=1, cutoff=0.6)
    hint = ""
    if close:
        near = close[0]
        meant = near if near in BACKENDS else ALIASES.get(near) or BY_DIST[near]
        hint = f" (did you mean {meant!r}?)"
    valid = ", ".join(BACKENDS)
    raise UsageError(f"unknown backend {name!r}{hint}; valid names: {valid} "
                     f"(aliases: {', '.join(sorted(ALIASES))})")


def parse_list(text: str | None) -> list[str]:
    """The backends to plan, install or remove, from a comma-separated list (all installable
    ones when text is None or 'all'): one per distribution, so a variant names the backend
    that installs it (`sage_fp16` -> `sage`; verification proves each variant with it)."""
    if text is None or text.strip().lower() == "all":
        return [n for n in BACKENDS if n != "sdpa" and primary(n) == n]
    out: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        n = primary(canonical(part))
        if n not in out:
            out.append(n)
    if not out:
        raise UsageError(f"no backend named in {text!r}; valid names: {', '.join(BACKENDS)}")
    return out


_SEP = re.compile(r"[-_.]+")


def normalize_dist(name: str) -> str:
    """PEP 503 normalization."""
    return _SEP.sub("-", name).lower()
