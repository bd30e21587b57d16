"""Property-based tests (hypothesis): configs refuse bad values by name; LoRA files round-trip and
garbled ones are refused with ValueError, never a crash from deep inside.

Configs: any value in any field of ``SamplerConfig``, ``LoraConfig`` or ``TrainConfig`` either builds
a config whose fields are all of their declared kind and usable (finite numbers, whole integers,
seeds a torch generator takes) or raises ValueError/TypeError whose message names the field.

LoRA files: random rank, alpha, targets, save dtype and arch on the tiny diffusers UNet and on an
LDM-named one: ``add_lora`` + random weights -> ``save_lora`` -> ``load_lora`` -> ``apply_lora_file``
on a fresh model gives back the same LoRA. Random state dicts (real and garbled module names, random
shapes, dtypes and alphas) given to ``kohya_to_peft``, ``load_lora`` (through a safetensors file),
``apply_lora_file`` and ``mix_loras`` either work or raise ValueError.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import re
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import safetensors.torch as st_torch
import torch
from hypothesis import assume, event, given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alignprop_core import config as config_mod  # noqa: E402
from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig  # noqa: E402
from alignprop_core.lora import (LoraFile, add_lora, apply_lora_file, has_lora, kohya_name,  # noqa: E402
                                 kohya_to_peft, ldm_to_diffusers_paths, load_lora, lora_parameters,
                                 lora_rank_alpha, lora_state_dict, mix_loras, save_lora)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- configs ----------------------------------------------------------------------------------------

CONFIGS = (SamplerConfig, LoraConfig, TrainConfig)
CHOICES = {"truncation": config_mod.TRUNCATION_STRATEGIES, "loss": config_mod.LOSS_SHAPES,
           "mixed_precision": config_mod.MIXED_PRECISION, "lr_schedule": config_mod.LR_SCHEDULES,
           "reward_augment": config_mod.REWARD_AUGMENTS}
SEEDS = ("seed", "eval_seed")  # torch generator seeds (LoraConfig.init_seed is hashed, any int works)
SPECIAL_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308, math.nan, math.inf, -math.inf]
SPECIAL_INTS = [0, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]

ANY_VALUE = st.one_of(
    st.integers(-3, 40), st.integers(-(10 ** 30), 10 ** 30), st.sampled_from(SPECIAL_INTS),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_FLOATS),
    st.floats(0.0, 1.0), st.booleans(), st.none(), st.text(max_size=6),
    st.sampled_from([c for options in CHOICES.values() for c in options] + ["to_q", "1", "nan"]),
    st.lists(st.text(max_size=4), max_size=3), st.lists(st.integers(), max_size=2).map(tuple),
    st.binary(max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _kind(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")


def plausible(f) -> st.SearchStrategy:
    """Mostly valid values for one field, so combinations reach the cross-field checks."""
    kind = _kind(f)
    if f.name in CHOICES:
        return st.sampled_from(CHOICES[f.name])
    if f.name == "target_modules":
        return st.lists(st.sampled_from(["to_q", "to_k", "to_v", "to_out.0", "conv1"]), max_size=3)
    if kind == "int":
        return st.integers(-1, 30)
    if kind == "float":
        return st.floats(-1.0, 12.0)
    if kind == "bool":
        return st.booleans()
    return st.text(max_size=4)


def names_the_field(err: Exception, cls: type, names: list[str]) -> bool:
    message = str(err)
    return any(f"{cls.__name__}.{n}" in message or re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def assert_usable(cfg) -> None:
    """Every field of an accepted config holds a value of its declared kind that the code can use."""
    for f in fields(cfg):
        value, kind, where = getattr(cfg, f.name), _kind(f), f"{type(cfg).__name__}.{f.name}={getattr(cfg, f.name)!r}"
        if kind in ("int", "float"):
            assert isinstance(value, numbers.Real) and not isinstance(value, bool), where
            assert math.isfinite(value), where
        if kind == "int":
            assert isinstance(value, numbers.Integral), where
        if kind == "bool":
            assert isinstance(value, bool), where
        if kind == "str":
            assert isinstance(value, str), where
        if f.name in CHOICES:
            assert value in CHOICES[f.name], where
        if f.name == "target_modules":
            assert isinstance(value, tuple) and value and all(isinstance(m, str) for m in value), where
        if f.name in SEEDS:
            torch.Generator().manual_seed(value)  # raises for a seed the trainer could never use


FIELDS = [pytest.param(cls, f.name, id=f"{cls.__name__}.{f.name}") for cls in CONFIGS for f in fields(cls)]


@pytest.mark.parametrize("cls, name", FIELDS)
@settings(max_examples=25, deadline=None)
@given(value=ANY_VALUE)
def test_any_value_in_one_field_is_accepted_usable_or_refused_by_name(cls, name, value):
    try:
        cfg = cls(**{name: value})
    except (ValueError, TypeError) as err:
        assert names_the_field(err, cls, [name]), f"{type(err).__name__}: {err}"
        return
    assert_usable(cfg)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_any_combination_is_accepted_usable_or_refused_by_name(cls, data):
    values = {f.name: data.draw(st.one_of(plausible(f), plausible(f), ANY_VALUE), label=f.name)
              for f in fields(cls) if data.draw(st.booleans(), label=f"set {f.name}")}
    try:
        cfg = cls(**values)
    except (ValueError, TypeError) as err:
        assert names_the_field(err, cls, list(values)), f"{type(err).__name__}: {err}"
        return
    assert_usable(cfg)


@pytest.mark.parametrize("value", [None, 3, 1.5, True])
def test_target_modules_that_is_not_a_sequence_is_refused_by_name(value):
    with pytest.raises((ValueError, TypeError), match="target_modules"):
        LoraConfig(target_modules=value)


@pytest.mark.parametrize("name, value", [("seed", 2 ** 64), ("eval_seed", -(2 ** 63) - 1)])
def test_seed_that_torch_refuses_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**{name: value})


# ---- LoRA round trip ----------------------------------------------------------------------------------

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
           "conv1", "conv2", "time_emb_proj", "conv_shortcut")
FLOAT32_ALPHAS = st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0, 0.25, 1.5])
SAVE_CAST = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.cache
def diffusers_unet():
    from tiny_models import make_unet

    return make_unet(torch.float32)


@functools.cache
def ldm_unet():
    from test_lora_keys import fake_ldm_unet, make_unet

    return fake_ldm_unet("sd15", make_unet("sd15"))


def run_unet(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)  # latents, context
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), c).sample


def randomise(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lora_parameters(module):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def round_trip(base, rank, alpha, targets, arch, dtype, seed):
    """(trained module, fresh module with the saved file applied, LoraFile), the trained one's
    weights rounded to the file's dtype so both hold the same LoRA."""
    model = copy.deepcopy(base)
    cfg = LoraConfig(rank=rank, alpha=alpha, target_modules=tuple(sorted(targets)), init_seed=seed)
    add_lora(model, cfg)
    randomise(model, seed)
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.copy_(p.to(SAVE_CAST[dtype]).float())
    fresh = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as folder:
        path = save_lora(Path(folder) / "lora.safetensors", model, cfg, dtype=dtype, arch=arch,
                         metadata={"alignprop.test": "round trip"})
        lora = load_lora(path, module=fresh)
    apply_lora_file(fresh, lora)
    return model, fresh, lora


def assert_same_lora(model, fresh, rank, alpha) -> None:
    want, got = lora_state_dict(model), lora_state_dict(fresh)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    stored_alpha = float(torch.tensor(alpha, dtype=torch.float32))  # files keep alpha as float32
    assert lora_rank_alpha(fresh) == (rank, stored_alpha)


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(1, 8), alpha=FLOAT32_ALPHAS | st.floats(0.01, 100.0),
       targets=st.sets(st.sampled_from(TARGETS), min_size=1), arch=st.sampled_from([None, "sd15", "sdxl"]),
       dtype=st.sampled_from(list(SAVE_CAST)), seed=st.integers(0, 2 ** 32 - 1))
def test_lora_file_round_trip_on_a_diffusers_unet(rank, alpha, targets, arch, dtype, seed):
    model, fresh, lora = round_trip(diffusers_unet(), rank, alpha, targets, arch, dtype, seed)
    assert (lora.rank, lora.target_modules) == (rank, tuple(sorted(targets)))
    assert_same_lora(model, fresh, rank, alpha)
    if float(torch.tensor(alpha, dtype=torch.float32)) == alpha:  # same scale: the same function
        assert torch.equal(run_unet(fresh), run_unet(model))
    # else the file's float32 alpha moves the scale alpha / rank by ~1e-8 relative; with large
    # alphas the attention softmax amplifies that past any fixed tolerance, so only the state is compared


@settings(max_examples=12, deadline=None)
@given(rank=st.integers(1, 8), alpha=FLOAT32_ALPHAS,
       targets=st.sets(st.sampled_from(TARGETS), min_size=1), arch=st.sampled_from([None, "sd15", "sdxl"]),
       dtype=st.sampled_from(list(SAVE_CAST)), seed=st.integers(0, 2 ** 32 - 1))
def test_lora_file_round_trip_on_an_ldm_unet(rank, alpha, targets, arch, dtype, seed):
    model, fresh, _ = round_trip(ldm_unet(), rank, alpha, targets, arch, dtype, seed)
    assert_same_lora(model, fresh, rank, alpha)


# ---- garbled LoRA states --------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool]
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@functools.cache
def real_layers(mapped_only: bool) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(kohya name, down shape without rank, up shape without rank) of the UNet's linear and conv
    layers; ``mapped_only``: just those with an LDM twin (transformer and res-block layers)."""
    mapped = set(ldm_to_diffusers_paths("sd15", diffusers_unet()).values())
    out = []
    for path, m in diffusers_unet().named_modules():
        if mapped_only and path not in mapped:
            continue
        if isinstance(m, torch.nn.Linear):
            out.append((kohya_name(path), (m.in_features,), (m.out_features,)))
        elif isinstance(m, torch.nn.Conv2d):
            out.append((kohya_name(path), (m.in_channels, *m.kernel_size), (m.out_channels, 1, 1)))
    return out


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int, fill: float | None = None) -> torch.Tensor:
    if fill is not None:
        value = torch.full(shape, fill, dtype=torch.float64)
        if not dtype.is_floating_point:  # NaN and +/-Inf have no integer value
            value = value.nan_to_num(0.0, posinf=100.0, neginf=-100.0)
        return value.to(dtype)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (values > 0) if dtype == torch.bool else (values * 3).to(dtype)


SHAPES = st.lists(st.integers(0, 5), max_size=4).map(tuple)
GARBLED_NAMES = st.one_of(
    st.text(max_size=12), st.sampled_from(["lora_unet_", "lora_te_text_model", "lora_unet_down_blocks_0",
                                           "lora_unet_input_blocks_1_1_proj_in", "lora_unet_mid_block_x",
                                           "lora_unet_up_blocks.0", "__metadata__x"]),
    st.builds(lambda a, b: f"lora_unet_{a}{b}", st.sampled_from(["down_blocks_", "input_blocks_", "middle_block_",
                                                                   "mid_block_", ""]), st.text(max_size=8)))
SUFFIX_OF_KEY = st.one_of(st.sampled_from(SUFFIXES), st.sampled_from(SUFFIXES), st.sampled_from(
    ["lora_A.weight", "weight", "lora_down", "alpha.0", "lora_up.weight.x", "hada_w1_a", ""]), st.text(max_size=6))


@st.composite
def lora_states(draw) -> dict[str, torch.Tensor]:
    """A kohya-form state over real layers of the tiny UNet; in about half the draws also garbled:
    factors of other shapes or dtypes, alphas of any shape and value, keys missing, garbled or added."""
    state: dict[str, torch.Tensor] = {}
    messy = draw(st.booleans(), label="messy")
    rank = draw(st.integers(0 if messy else 1, 4), label="rank")
    layers = draw(st.lists(st.sampled_from(real_layers(mapped_only=not messy)), min_size=0 if messy else 1,
                           max_size=3, unique=True), label="layers")
    garbled = draw(st.lists(st.tuples(GARBLED_NAMES, SHAPES, SHAPES), max_size=2 if messy else 0),
                   label="garbled modules")
    modules = [(n, (rank, *d), (u[0], rank, *u[1:])) for n, d, u in layers] + garbled
    alpha = draw(st.sampled_from([1.0, 4.0]) | (st.floats(allow_nan=True, allow_infinity=True) if messy
                                                else st.floats(0.1, 64.0)), label="alpha")
    with_alpha = draw(st.booleans(), label="with alpha")  # alpha is optional (it defaults to the rank)
    alpha_dtype = draw(st.sampled_from(DTYPES[:4]), label="alpha dtype")
    for i, (name, down, up) in enumerate(modules):
        dtype = draw(st.sampled_from(DTYPES[:3]) | (st.sampled_from(DTYPES) if messy else st.nothing()),
                     label="dtype")
        shapes = {"lora_down.weight": down, "lora_up.weight": up, "alpha": ()}
        for part in shapes:
            if messy and draw(st.integers(0, 5)) == 0:
                shapes[part] = draw(SHAPES, label=f"{part} shape")
        for part in ("lora_down.weight", "lora_up.weight"):
            if not messy or draw(st.integers(0, 9)):  # now and then a factor is missing
                state[f"{name}.{part}"] = make_tensor(shapes[part], dtype, seed=i)
        if with_alpha != (messy and draw(st.integers(0, 5)) == 0):  # messy: one module may differ
            if messy and draw(st.integers(0, 3)) == 0:
                alpha = draw(st.floats(allow_nan=True, allow_infinity=True), label="module alpha")
                alpha_dtype = draw(st.sampled_from(DTYPES), label="module alpha dtype")
            state[f"{name}.alpha"] = make_tensor(shapes["alpha"], alpha_dtype, seed=i, fill=alpha)
    for name, suffix, shape in draw(st.lists(st.tuples(GARBLED_NAMES, SUFFIX_OF_KEY, SHAPES),
                                             max_size=2 if messy else 0), label="extra keys"):
        state[f"{name}.{suffix}" if suffix else name] = make_tensor(shape, torch.float32,
                                                                    seed=0)
    return state


@st.composite
def lora_pairs(draw) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two states over the same keys, b's factors per module as a's, or made for another base model
    (other in/out sizes), or of another rank; or, a quarter of the time, two unrelated states."""
    a = draw(lora_states(), label="a")
    if draw(st.integers(0, 3), label="unrelated") == 0:
        return a, draw(lora_states(), label="b")
    b, rank, changes = {}, draw(st.integers(1, 5), label="b rank"), {}
    for key, value in a.items():
        module, _, part = key.partition(".")
        change = changes.setdefault(module, draw(st.sampled_from(["same", "base", "rank"]), label="change"))
        shape = list(value.shape)
        if change == "base" and part == "lora_down.weight" and len(shape) >= 2:
            shape[1] = draw(st.integers(1, 6), label="in size")
        if change == "base" and part == "lora_up.weight" and shape:
            shape[0] = draw(st.integers(1, 6), label="out size")
        if change == "rank" and part in ("lora_down.weight", "lora_up.weight") and len(shape) >= 2:
            shape[0 if part == "lora_down.weight" else 1] = rank
        if part == "alpha":
            b[key] = value.clone()
        else:
            b[key] = make_tensor(tuple(shape), draw(st.sampled_from(DTYPES[:3]), label="dtype"), seed=1)
    return a, b


def write_file(folder: str, name: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    assume("__metadata__" not in state)  # safetensors reserves it for the header
    path = Path(folder) / name
    # safetensors 0.8 writes an unreadable header for no tensors with an empty metadata dict
    st_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata or None)
    return path


METADATA = st.dictionaries(st.sampled_from(["alignprop.lora_target_modules", "ss_network_dim", "x"]),
                           st.sampled_from(['["to_q"]', "[1, 2]", "{}", "not json", "3", '"to_q"', "null"])
                           | st.text(max_size=6), max_size=2)
MODULES = {"diffusers": diffusers_unet, "ldm": ldm_unet}


@settings(max_examples=100, deadline=None)
@given(state=lora_states(), naming=st.sampled_from(list(MODULES)))
def test_kohya_to_peft_converts_or_refuses_a_random_state(state, naming):
    try:
        peft_state, _, _ = kohya_to_peft(state, MODULES[naming]())
    except ValueError:
        event("refused")
        return
    event("converted")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in peft_state)


@settings(max_examples=100, deadline=None)
@given(state=lora_states(), metadata=METADATA, check_module=st.booleans())
def test_load_lora_reads_or_refuses_a_random_file(state, metadata, check_module):
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(folder, "random.safetensors", state, metadata)
        try:
            lora = load_lora(path, module=diffusers_unet() if check_module else None)
        except ValueError:
            event("refused")
            return
    event("loaded")
    assert lora.state.keys() == state.keys()
    assert isinstance(lora.rank, int) and isinstance(lora.alpha, float)
    assert isinstance(lora.target_modules, tuple)


@settings(max_examples=30, deadline=None)
@given(state=lora_states(), injected=st.booleans())
def test_apply_lora_file_applies_or_refuses_and_leaves_the_model_as_it_was(state, injected):
    fresh = copy.deepcopy(diffusers_unet())
    if injected:  # a model that already carries a LoRA (rank 4, alpha 4, attention projections)
        add_lora(fresh, LoraConfig())
    before = lora_state_dict(fresh) if injected else None
    with tempfile.TemporaryDirectory() as folder:
        path = write_file(folder, "random.safetensors", state, {})
        try:
            lora = load_lora(path)
        except ValueError:
            event("refused by load_lora")
            return
    try:
        apply_lora_file(fresh, lora)
    except ValueError:
        event("refused by apply_lora_file")
        if not injected:
            assert not has_lora(fresh)  # nothing half-applied
        return
    event("applied")
    assert lora_rank_alpha(fresh) == (lora.rank, lora.alpha)
    assert before is None or lora_state_dict(fresh).keys() == before.keys()


@settings(max_examples=100, deadline=None)
@given(pair=lora_pairs(), t=st.floats(-2, 3) | st.sampled_from(SPECIAL_FLOATS),
       mode=st.sampled_from(["weights", "delta", "Weights", ""]))
def test_mix_loras_mixes_or_refuses_random_loras(pair, t, mode):
    loras = []
    with tempfile.TemporaryDirectory() as folder:  # what the mix node is given: files our loader accepted
        for name, state in zip(("a.safetensors", "b.safetensors"), pair):
            try:
                loras.append(load_lora(write_file(folder, name, state, {})))
            except ValueError:
                event("refused by load_lora")
                return
    try:
        mixed = mix_loras(loras[0], loras[1], t, mode)
    except ValueError:
        event("refused by mix_loras")
        return
    event("mixed")
    assert mixed.state.keys() == loras[0].state.keys() | {k for k in mixed.state if k.endswith(".alpha")}


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=64) | st.builds(lambda n, rest: n.to_bytes(8, "little") + rest,
                                                 st.integers(0, 2 ** 64 - 1), st.binary(max_size=40)))
def test_load_lora_refuses_random_bytes(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "broken.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError):
            load_lora(path)


@pytest.mark.parametrize("data", [b"", b"not a safetensors file", b"\x08" + bytes(7) + b"{}"],
                         ids=["empty", "text", "cut"])
def test_load_lora_refuses_a_file_that_is_not_safetensors(tmp_path, data):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        load_lora(path)


# ---- load-side cases the properties once found (minimal examples) -----------------------------------

def lora_file_with(folder: Path, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None = None) -> Path:
    state = {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up}
    if alpha is not None:
        state["lora_unet_x.alpha"] = alpha
    path = folder / "x.safetensors"
    st_torch.save_file(state, str(path))
    return path


def test_zero_dim_lora_down_is_refused(tmp_path):
    with pytest.raises(ValueError):
        load_lora(lora_file_with(tmp_path, torch.tensor(1.0), torch.zeros(3, 1)))


@pytest.mark.parametrize("alpha", [torch.tensor([]), torch.tensor([1.0, 2.0])], ids=["empty", "two"])
def test_alpha_that_is_not_one_number_is_refused(tmp_path, alpha):
    with pytest.raises(ValueError):
        load_lora(lora_file_with(tmp_path, torch.zeros(2, 4), torch.zeros(3, 2), alpha))


@pytest.mark.parametrize("mode", ["weights", "delta"])
def test_mixing_factors_of_different_shapes_is_refused(mode):
    def lora(width):
        state = {"lora_unet_x.lora_down.weight": torch.ones(2, width), "lora_unet_x.lora_up.weight": torch.ones(3, 2)}
        return LoraFile(state=state, rank=2, alpha=1.0)

    with pytest.raises(ValueError):
        mix_loras(lora(4), lora(5), 0.5, mode)


def test_rank_zero_lora_is_refused(tmp_path):
    with pytest.raises(ValueError):
        lora = load_lora(lora_file_with(tmp_path, torch.zeros(0, 4), torch.zeros(3, 0)))
        mix_loras(lora, lora, 0.5, "delta")
