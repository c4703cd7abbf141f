"""Config files, variants, overrides and their one-line errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import llmjax
import llmjax.models  # noqa: F401  (registers every architecture)
from conftest import ROOT
from helpers import config, users_config
from llmjax.config import ConfigError, model_config

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py"))
ARCH_CONFIGS = [c for c in CONFIGS if c in llmjax.ARCHS]


@pytest.mark.parametrize("name", ARCH_CONFIGS)
@pytest.mark.parametrize("variant", ["default", "small", "tiny"])
def test_every_config_and_variant_loads(name, variant):
    cfg = llmjax.load_config(f"{ROOT}/configs/{name}.py:{variant}")
    assert set(cfg.keys()) == {"model", "data", "train", "eval", "logging"}
    mcfg = model_config(cfg)
    assert mcfg.arch in llmjax.ARCHS
    assert mcfg.dtype == ("bfloat16" if variant == "default" else "float32")


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - set(ARCH_CONFIGS)))
def test_recipe_configs_load(name):
    cfg = llmjax.load_config(f"{ROOT}/configs/{name}.py")
    assert model_config(cfg).arch in llmjax.ARCHS


def test_quickstart_modern_variant_changes_only_the_block():
    """configs/shakespeare_char.py:modern: the quickstart's recipe and budget, the Llama-style block,
    parameters within 1% of the baby GPT's."""
    from llmjax.summary import summarize

    base = llmjax.load_config(f"{ROOT}/configs/shakespeare_char.py")
    modern = llmjax.load_config(f"{ROOT}/configs/shakespeare_char.py:modern")
    for group in ("train", "data", "eval", "logging"):
        assert modern[group].to_dict() == base[group].to_dict(), group
    assert (model_config(base).arch, model_config(modern).arch) == ("vanilla", "modern")
    shared = ("vocab_size", "padded_vocab_size", "context_len", "n_layer", "n_head", "head_dim", "d_model",
              "dtype", "matmul_dtype", "init_std", "norm_eps")
    assert {k: modern.model[k] for k in shared} == {k: base.model[k] for k in shared}
    n_base, n_modern = (summarize(c)["params_total"] for c in (base, modern))
    assert abs(n_modern / n_base - 1) < 0.01, (n_base, n_modern)


def test_no_suffix_means_default():
    a = llmjax.load_config(f"{ROOT}/configs/modern.py").to_dict()
    b = llmjax.load_config(f"{ROOT}/configs/modern.py:default").to_dict()
    assert a == b


def test_small_variants_are_about_10m_parameters():
    from llmjax.summary import summarize

    for name in ("vanilla", "modern", "gqa", "mla"):
        n = summarize(config(name, "small"))["params_total"]
        assert 9e6 < n < 11.5e6, (name, n)


def test_model_gets_a_frozen_dataclass():
    mcfg = model_config(config("modern"))
    with pytest.raises(Exception):
        mcfg.n_layer = 3  # frozen
    assert mcfg.replace(n_layer=3).n_layer == 3


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.n_layr": 3}, "unknown config key 'model.n_layr' (did you mean 'model.n_layer'?)"),
        ({"trian.lr": 1e-3}, "unknown config key 'trian' (did you mean 'train'?)"),
        ({"train.learning_rate": 1e-3}, "unknown config key 'train.learning_rate'"),
        ({"model.n_layer": "four"}, "config key 'model.n_layer'"),
        ({"model.dtype": "bf16"}, "model.dtype='bf16' is not one of float32, bfloat16, float16 (did you mean 'bfloat16'?)"),
        ({"model.attention_impl": "flash"}, "model.attention_impl='flash' is not one of auto, cudnn, xla"),
        ({"model.remat": "ful"}, "(did you mean 'full'?)"),
        ({"model.arch": "vanila"}, f"unknown arch 'vanila'; registered: {', '.join(sorted(llmjax.ARCHS))} (did you mean 'vanilla'?)"),
        ({"model.padded_vocab_size": 10}, "smaller than model.vocab_size=65"),
        ({"model.n_kv_head": 3}, "model.n_head=4 must be a multiple of model.n_kv_head=3"),
        ({"model.matmul_dtype": "bf16"}, "model.matmul_dtype='bf16' is not one of '', 'bfloat16' (did you mean 'bfloat16'?)"),
        ({"model.matmul_dtype": "bfloat16", "model.dtype": "float16"}, "model.matmul_dtype='bfloat16' needs model.dtype='float32'"),
        ({"model.moe_impl": "blocks"}, "model.moe_impl='blocks' is not one of auto, blocked, dense, gather, ragged_dot (did you mean 'blocked'?)"),
        ({"model.moe_block_rows": 0}, "model.moe_block_rows must be positive, got 0"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, message):
    arch = "modern" if "n_kv_head" in str(overrides) else "moe" if "moe_" in str(overrides) else "vanilla"
    spec = f"{ROOT}/configs/{arch}.py:tiny"
    with pytest.raises(ConfigError) as err:
        llmjax.load_config(spec, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_aux_loss_weights_the_model_does_not_return_are_refused():
    """train.aux_loss_weights keys the model never returns (a typo, or the MoE's weights on a dense
    model: a config file's, or the group given whole) were ignored, the run training without them:
    one line naming them and the losses the model returns. The MoE's own names still load."""
    cases = [("moe", {"load_balance": 0.01, "router_z": 0.001, "load_balanse": 1.0},
              "train.aux_loss_weights has 'load_balanse', which the moe model does not return (it returns load_balance, router_z) "
              "(did you mean 'load_balance'?); remove it"),
             ("vanilla", {"load_balance": 0.01}, "train.aux_loss_weights has 'load_balance', which the vanilla model does not return "
                                                 "(it returns none); remove it")]
    for arch, weights, message in cases:
        with pytest.raises(ConfigError) as err:
            llmjax.load_config(f"{ROOT}/configs/{arch}.py:tiny", {"train.aux_loss_weights": weights})
        assert str(err.value) == message
    assert dict(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", {"train.aux_loss_weights.router_z": 0.01}).train.aux_loss_weights) == {
        "load_balance": 0.01, "router_z": 0.01}


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -0.01, "x", True])
def test_aux_loss_weights_that_are_no_finite_number_of_at_least_0_are_refused(weight):
    """A train.aux_loss_weights value that is not a finite number >= 0 is one line naming it: NaN
    compiled and stopped the run at step 1 as a 'non-finite loss' (its cross-entropy finite), a
    string (the group given whole) was a traceback after the workdir was written, and a negative
    weight trained the router away from balance without a word. 0 (logged, not trained) loads."""
    with pytest.raises(ConfigError) as err:
        llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", {"train.aux_loss_weights": {"load_balance": weight, "router_z": 0.001}})
    assert str(err.value) == f"train.aux_loss_weights.load_balance must be a finite number of at least 0 (0: logged, not trained), got {weight!r}"
    assert llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", {"train.aux_loss_weights.router_z": 0}).train.aux_loss_weights.router_z == 0


def test_an_empty_dataset_name_is_refused():
    """data.dataset='' was read as the data folder itself: 'no prepared dataset of that name in .',
    with advice to run `llmjax.prepare '' --out data`, which would write into the data folder."""
    for name in ["", "  "]:
        with pytest.raises(ConfigError, match=r"^data\.dataset is empty; set --config\.data\.dataset to a dataset's name"):
            llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"data.dataset": name})


def test_a_model_size_beyond_int32_is_refused():
    """model.n_layer=10**20 (any integer model key beyond int64) was a traceback in the trainer's
    model build, and llmjax.summary printed a 10**24-parameter model: one line naming the key."""
    for key in ["n_layer", "d_ff", "context_len"]:
        with pytest.raises(ConfigError) as err:
            llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {f"model.{key}": 10**20})
        assert str(err.value) == f"model.{key}=100000000000000000000 is too large: at most 2147483647 (2**31 - 1, as token ids and positions are int32)"
    assert llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"model.d_ff": 2**31 - 1}).model.d_ff == 2**31 - 1


def test_a_zero_or_negative_init_std_is_refused():
    """model.init_std=0 built all-zero weights, whose gradients are all zero: the run's loss stayed
    at ln(vocab), silently; a negative one was no N(0, std). One line, as for norm_eps."""
    for value in [0.0, -0.02]:
        with pytest.raises(ConfigError) as err:
            llmjax.load_config(f"{ROOT}/configs/modern.py:tiny", {"model.init_std": value})
        assert str(err.value) == f"model.init_std must be positive, got {value}"


def test_group_changes_for_a_variant_that_does_not_exist_are_refused(tmp_path):
    """make_config(variant, MODELS, train={'tyni': {...}}): the changes of a variant not in MODELS (a
    typo) were dropped, so tiny trained on the shared defaults, silently: one line naming it."""
    f = users_config(tmp_path / "mine.py", "def get_config(variant='default'):\n"
                                           "    return make_config(variant, v.MODELS, train={'tyni': {'lr': 3e-3}})\n")
    with pytest.raises(ConfigError) as err:
        llmjax.load_config(f"{f}:tiny")
    assert str(err.value) == ("make_config's train changes name variant 'tyni', which is not in its models "
                              "(default, small, tiny, medium, large, xl) (did you mean 'tiny'?)")


def test_unknown_key_written_in_a_config_file(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text(
        "from llmjax.config import make_config\n"
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('v', '{ROOT}/configs/vanilla.py')\n"
        "v = importlib.util.module_from_spec(spec); spec.loader.exec_module(v)\n"
        "MODELS = {k: dict(m) for k, m in v.MODELS.items()}\n"
        "MODELS['tiny']['n_embd'] = 64\n"
        "def get_config(variant='default'):\n    return make_config(variant, MODELS)\n"
    )
    with pytest.raises(ConfigError, match=r"unknown key 'model.n_embd' for arch 'vanilla'"):
        llmjax.load_config(f"{f}:tiny")
    with pytest.raises(ConfigError, match=r"unknown variant 'tinny'; choose one of default, small, tiny, medium, large, xl \(did you mean 'tiny'\?\)"):
        llmjax.load_config(f"{f}:tinny")


def test_a_config_file_that_fails_is_one_line_naming_it(tmp_path):
    """A config file of one's own with a syntax error, a failed import, code that raises, a
    get_config() without the variant argument or one that returns nothing: one line that names the
    file and what to do (before: a traceback, or 'get_config() takes 0 positional arguments but 1
    was given', or "'NoneType' object has no attribute 'keys'")."""
    def load(name, text, spec_suffix=""):
        f = tmp_path / name
        f.write_text(text)
        with pytest.raises(ConfigError) as err:
            llmjax.load_config(f"{f}{spec_suffix}")
        assert "\n" not in str(err.value)
        return str(err.value)

    assert load("syn.py", "x = 1\ndef get_config(:\n") == f"config file '{tmp_path}/syn.py' does not load: SyntaxError: invalid syntax (line 2)"
    assert load("imp.py", "import no_such_module_here\n") == (
        f"config file '{tmp_path}/imp.py' does not load: ModuleNotFoundError: No module named 'no_such_module_here' (line 1)")
    assert load("raises.py", "def get_config(variant):\n    return {}[variant]\n", ":tiny") == (
        f"config file '{tmp_path}/raises.py': get_config('tiny') failed: KeyError: 'tiny' (line 2)")
    assert load("none.py", "def get_config(variant='default'):\n    pass\n").startswith(
        f"config file '{tmp_path}/none.py': get_config() returned NoneType, not an ml_collections.ConfigDict")
    assert load("two.py", "def get_config(a, b):\n    pass\n") == (
        f"config file '{tmp_path}/two.py': get_config must take at most one argument, the variant name")
    # nanodo's form, get_config() without an argument, is what config_flags calls without a variant
    noarg = users_config(tmp_path / "noarg.py", "def get_config():\n    return make_config('tiny', v.MODELS)\n")
    assert llmjax.load_config(str(noarg)).to_dict() == llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny").to_dict()
    with pytest.raises(ConfigError, match=r"its get_config\(\) takes no variant; drop ':small' or give get_config a variant argument$"):
        llmjax.load_config(f"{noarg}:small")


def test_a_get_config_that_needs_its_variant_gets_default_without_a_suffix(tmp_path):
    """The README's own form, `get_config(variant)` with no default: a spec without a suffix calls
    it with 'default', as before config_flags' no-argument call was copied (a regression:
    'get_config() failed: TypeError: ... missing 1 required positional argument'), from Python
    (llmjax.compare loads its configs so) and from the command line, where config_flags is given
    the ':default' it needs."""
    f = users_config(tmp_path / "needs.py", "def get_config(variant):\n    return make_config(variant, v.MODELS)\n")
    want = llmjax.load_config(f"{ROOT}/configs/vanilla.py").to_dict()
    assert llmjax.load_config(str(f)).to_dict() == want
    assert llmjax.load_config(f"{f}:tiny").to_dict() == llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny").to_dict()
    cmd = [sys.executable, "-m", "llmjax.summary", "--config", str(f), "--config.model.n_layer=3", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert json.loads(proc.stdout)["n_layer"] == 3


def test_an_empty_variant_suffix_means_default():
    """`configs/modern.py:` (an empty suffix): the default variant, as no suffix; before, the command
    line printed config_flags' traceback of "unknown variant ''" on one line."""
    assert llmjax.load_config(f"{ROOT}/configs/modern.py:").to_dict() == llmjax.load_config(f"{ROOT}/configs/modern.py").to_dict()
    cmd = [sys.executable, "-m", "llmjax.summary", "--config", "configs/modern.py:", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_cli_config_file_with_a_syntax_error_is_one_line(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def get_config(variant='default')\n    pass\n")
    cmd = [sys.executable, "-m", "llmjax.summary", "--config", f"{f}:tiny"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, f"error: config file '{f}' does not load: SyntaxError: expected ':' (line 1)\n"), proc.stderr


def test_a_config_file_rewritten_within_a_second_is_read_again(tmp_path, monkeypatch):
    """A config file is read from its source at every load, and no bytecode cache is written beside
    it, by load_config or by the command line's --config (config_flags imports it): Python's cache
    holds for a source of the same size and modification second, so a config rewritten within the
    second at the same length (as a script writing configs does) was read as the one before."""
    from helpers import cli_cases

    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # (as Python's default; our machines set PYTHONDONTWRITEBYTECODE)
    f = tmp_path / "mine.py"
    for n_layer in (1, 2, 3):
        f.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('base', {str(ROOT / 'configs' / 'vanilla.py')!r})\n"
                     f"base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n\n\n"
                     f"def get_config(variant='tiny'):\n    cfg = base.get_config(variant)\n    cfg.model.n_layer = {n_layer}\n    return cfg\n")
        os.utime(f, (1_700_000_000, 1_700_000_000))  # (the same second each time, the same size)
        assert llmjax.load_config(str(f)).model.n_layer == n_layer
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    r, = cli_cases("llmjax.summary", [["--config", str(f), "--json"]], env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["n_layer"] == 3, r.stderr[-2000:]
    assert not (tmp_path / "__pycache__").exists()


def test_set_values_parse_as_config_overrides_do():
    """`--set KEY=VALUE` (llmjax.bench, llmjax.compare) gives the value `--config.KEY=VALUE` gives,
    the reference being config_flags' own parse: before, --set read JSON, so `model.scan_layers=True`
    and `=1` (both accepted by --config.*) were refused, as was a string key given digits."""
    from llmjax.config import parse_value

    spec = f"{ROOT}/configs/vanilla.py:tiny"
    cases = [("model.scan_layers", "True"), ("model.scan_layers", "1"), ("model.scan_layers", "false"), ("model.scan_layers", "FALSE"),
             ("train.lr", "1"), ("train.lr", "3e-4"), ("train.max_steps", "7"), ("model.init_std", "0.5"),
             ("data.dir", "2026"), ("eval.tasks", "hellaswag,arc_easy"), ("train.loss_scale", "1024"), ("model.matmul_dtype", "")]
    for key, text in cases:
        want = config_flags_value(spec, key, text)
        got = parse_value(llmjax.load_config(spec), key, text)
        assert (got, type(got)) == (want, type(want)), (key, text, got, want)
    for key, text, message in [("model.scan_layers", "yes", r"^model\.scan_layers=yes: model\.scan_layers takes true or false$"),
                               ("train.max_steps", "1e3", r"^train\.max_steps=1e3: train\.max_steps takes an integer$"),
                               ("model.n_layr", "3", r"^unknown config key 'model\.n_layr' \(did you mean 'model\.n_layer'\?\)$")]:
        with pytest.raises(ConfigError, match=message):
            parse_value(llmjax.load_config(spec), key, text)


def config_flags_value(spec: str, key: str, text: str):
    """The value `--config.KEY=TEXT` gives KEY with `--config=SPEC` (config_flags' own parse)."""
    from absl import flags
    from ml_collections import config_flags

    fv, argv = flags.FlagValues(), ["prog", f"--config={spec}", f"--config.{key}={text}"]
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    want = fv.config
    for part in key.split("."):
        want = want[part]
    return want


def test_set_group_values_parse_as_config_overrides_do():
    """A group given whole by `--set` (train.mesh, train.aux_loss_weights) reads the Python dict that
    `--config.KEY={...}` reads (config_flags' own parse the reference): it was read as JSON only, so
    `--set train.mesh={'data': 1, ...}`, the README's form, was refused ('... is of original type
    <class 'str'> and cannot be casted'); JSON's form still reads."""
    from llmjax.config import parse_value, set_key, validate

    # (each loss the model returns needs its weight, config.validate: the MoE's two, the dense model's none)
    cases = [("vanilla", "train.mesh", "{'data': 1, 'fsdp': 1, 'expert': 1}"),
             ("moe", "train.aux_loss_weights", "{'load_balance': 0.02, 'router_z': 0.001}"), ("vanilla", "train.aux_loss_weights", "{}")]
    for arch, key, text in cases:
        spec = f"{ROOT}/configs/{arch}.py:tiny"
        want = config_flags_value(spec, key, text)
        cfg = llmjax.load_config(spec)
        got = parse_value(cfg, key, text)
        assert got == want.to_dict(), (key, text, got, want)
        set_key(cfg, key, got)
        validate(cfg)
    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny")
    assert parse_value(cfg, "train.mesh", '{"data": 1, "fsdp": 1, "expert": 1}') == {"data": 1, "fsdp": 1, "expert": 1}


def test_a_variant_of_ones_own_trains_on_the_recipe_it_is_named_after(tmp_path):
    """An idea tried as a new variant (`small_nobias`, the README's way) trains on small's data and
    recipe, not the GPU recipe of `default`: it did, so its run asked for fineweb_edu, and a
    comparison with `--set data.dataset=...` silently set lr 6e-4 / warmup 700 / beta2 0.95 against
    small's 1e-3 / 100 / 0.99."""
    f = users_config(
        tmp_path / "mine.py",
        "MODELS = dict(v.MODELS)\n"
        "for base in ('small', 'tiny', 'default'):\n"
        "    MODELS[base + '_nobias'] = {**MODELS[base], 'bias': False}\n"
        "MODELS['tiny-wide'] = {**MODELS['tiny'], 'd_ff': 512}\n"
        "MODELS['smallish'] = dict(MODELS['small'])\n"
        "def get_config(variant='default'):\n    return make_config(variant, MODELS)\n"
    )
    for variant, base in [("small_nobias", "small"), ("tiny_nobias", "tiny"), ("tiny-wide", "tiny"),
                          ("default_nobias", "default"), ("smallish", "default"), ("medium", "default")]:
        mine, theirs = llmjax.load_config(f"{f}:{variant}"), llmjax.load_config(f"{ROOT}/configs/vanilla.py:{base}")
        for group in ("data", "train", "eval", "logging"):
            assert mine[group].to_dict() == theirs[group].to_dict(), (variant, group)
    assert llmjax.load_config(f"{f}:small_nobias").train.lr != llmjax.load_config(f"{f}:default").train.lr  # (the test can fail)


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_widths_must_be_positive(arch):
    """A zero or negative head count, head or MLP width, rope_base or norm_eps is one line, for every
    architecture that has it (before: a traceback in the first forward, a model without heads or
    MLP, or NaN logits)."""
    values = config(arch).model.to_dict()
    names = [n for n in ("n_head", "head_dim", "d_ff", "rope_base", "norm_eps", "d_model", "n_layer") if n in values]
    assert {"d_ff", "norm_eps"} <= set(names)
    for name in names:
        for bad in (0, -2):
            with pytest.raises(ConfigError, match=rf"^model\.{name} must be positive, got {bad}(\.0)?$"):
                model_config({**values, name: bad})


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_model_numbers_must_be_finite(arch):
    """A NaN or infinite float in the model group (norm_eps, init_std, rope_base, the SSM's dt_min /
    dt_max, the MoE's capacity_factor) is one line: NaN passed the positivity checks and gave NaN
    logits (norm_eps, init_std, rope_base), and capacity_factor=inf crashed in the capacity mode's
    ceil ('cannot convert float infinity to integer')."""
    values = config(arch).model.to_dict()
    names = [k for k, v in values.items() if isinstance(v, float)]
    assert {"init_std", "norm_eps"} <= set(names)
    for name in names:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(ConfigError, match=rf"^model\.{name} must be a finite number, got {bad}$"):
                model_config({**values, name: bad})


def test_missing_model_key_is_named():
    values = config("mla").model.to_dict()
    del values["kv_lora_rank"]
    with pytest.raises(ConfigError, match="missing model key\\(s\\): kv_lora_rank"):
        model_config(values)


def test_optional_model_keys_have_defaults():
    """matmul_dtype may be left out of a config file or an older run's config.json ('' = model.dtype),
    and is still in every ConfigDict, so --config.model.matmul_dtype can set it."""
    values = config("vanilla").model.to_dict()
    assert values["matmul_dtype"] == ""
    del values["matmul_dtype"]
    assert model_config(values).matmul_dtype == "" and model_config(values).narrow_matmuls is None
    assert model_config({**values, "matmul_dtype": "bfloat16"}).narrow_matmuls == jnp.bfloat16
    assert model_config({**values, "matmul_dtype": "bfloat16", "dtype": "bfloat16"}).narrow_matmuls is None  # already bf16
    assert config("vanilla", matmul_dtype="bfloat16").model.matmul_dtype == "bfloat16"


def test_wrong_type_in_model_group():
    values = config("vanilla").model.to_dict()
    values["scan_layers"] = 1
    with pytest.raises(ConfigError, match="model.scan_layers for arch 'vanilla' must be bool"):
        model_config(values)


def test_cli_errors_are_one_line_without_traceback():
    """What a user sees from `python -m llmjax.summary` with a misspelled override (one process)."""
    cmd = [sys.executable, "-m", "llmjax.summary", "--config", "configs/modern.py:tiny", "--config.model.n_layr=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'model.n_layr' (did you mean 'model.n_layer'?)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_a_group_given_whole_is_checked_key_by_key():
    """`--config.train.mesh={...}` or `--config.eval={...}` (config_flags takes a dict for a group)
    replaces the whole group, past the per-key checks: a mesh axis misspelled or unknown was ignored
    ({'data': -1, 'fdsp': 4} trained pure data parallelism on every device), a group missing keys
    was a bare KeyError ('every_steps'), a value of another type got through."""
    spec = f"{ROOT}/configs/vanilla.py:tiny"
    for override, message in [
        ({"train.mesh": {"data": -1, "fdsp": 4}}, "unknown config key 'train.mesh.fdsp' (did you mean 'fsdp'?) (the mesh's axes: data, fsdp, expert)"),
        ({"train.mesh": {"data": 1, "tensor": 2}}, "unknown config key 'train.mesh.tensor' (the mesh's axes: data, fsdp, expert)"),
        ({"train.mesh": {"data": "x"}}, "config key 'train.mesh.data' must be int, got str 'x'"),
        ({"eval": {}}, "config key 'eval.every_steps' is missing; a group given whole (--config.eval={...}) replaces all its keys: set them "
                       "one by one, --config.eval.KEY=VALUE"),
        ({"train": {"lr": 1e-3}}, "config key 'train.seed' is missing; a group given whole (--config.train={...})"),
        ({"data": {"dataset": "tinyshakespeare_char", "dir": 3}}, "config key 'data.dir' must be str, got int 3"),
        ({"logging": {"wandb": "no", "wandb_project": "x", "progress_bar": True}}, "config key 'logging.wandb' must be bool, got str 'no'"),
    ]:
        cfg = llmjax.load_config(spec)
        with cfg.unlocked():
            for key, value in override.items():
                group, _, name = key.partition(".")
                if name:
                    cfg[group][name] = value
                else:
                    cfg[group] = value
        with pytest.raises(ConfigError) as err:
            llmjax.config.validate(cfg)
        assert str(err.value).startswith(message), str(err.value)
    cfg = llmjax.load_config(spec)  # (a mesh of fewer axes, an int for a float, a static loss scale as a number: fine)
    with cfg.unlocked():
        cfg.train.mesh = {"data": 1}
        cfg.train.lr = 1
    llmjax.config.validate(cfg)
    cmd = [sys.executable, "-m", "llmjax.summary", "--config", "configs/vanilla.py:tiny", "--config.train.mesh={'data': -1, 'fdsp': 4}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "error: unknown config key 'train.mesh.fdsp' (did you mean 'fsdp'?) (the mesh's axes: "
                                                 "data, fsdp, expert)\n"), proc.stderr


def test_cli_override_without_a_config_before_it_says_so():
    """--config.KEY=VALUE before --config, or with none: one line saying to give --config first
    (config_flags said 'Unknown command line flag' and 'Found ... before a value for --config was
    specified')."""
    from helpers import cli_cases

    cases = [["--config.model.n_layer=3"], ["--config.model.n_layer=3", "--config", "configs/vanilla.py:tiny"],
             ["--noconfig.model.scan_layers", "--config=configs/vanilla.py:tiny"]]
    want = ["error: --config.model.n_layer=3 overrides a key of the --config file; give --config configs/FILE.py[:variant] before it",
            "error: --config.model.n_layer=3 comes before --config; give --config configs/vanilla.py:tiny first, then its overrides",
            "error: --noconfig.model.scan_layers comes before --config; give --config configs/vanilla.py:tiny first, then its overrides"]
    for r, line in zip(cli_cases("llmjax.summary", cases), want):
        assert (r.returncode, r.stderr) == (2, line + "\n"), r.stderr


def test_cli_two_configs_or_a_group_and_one_of_its_keys_are_one_line(tmp_path):
    """--config given twice: absl kept the last (two configs trained the second, silently), and with
    overrides between them config_flags said "The flag 'config.train.max_steps' is defined twice". A
    group given whole beside one of its keys: "max_steps is not a valid key or attribute of <class
    'ml_collections...ConfigDict'>". The trainer's --workdir given twice trained in the last."""
    from helpers import cli_runs

    v, g = "configs/vanilla.py:tiny", "configs/gqa.py:tiny"
    w = f"--workdir={tmp_path / 'run'}"  # (where a run would go, were one started)
    runs = [("llmjax.train", ["--config", v, "--config", g, w]), ("llmjax.train", ["--config", v, "--config.train.max_steps=1", f"--config={v}", w]),
            ("llmjax.train", ["--config", v, "--config.train={'lr': 1.0}", "--config.train.max_steps=1", w]),
            ("llmjax.train", ["--config", v, "--config.train.mesh.data=1", "--config.train.mesh={'data': 1}", w]),
            ("llmjax.train", ["--config", v, "--workdir", str(tmp_path / "a"), f"--workdir={tmp_path / 'b'}"])]
    want = [f"error: --config is given 2 times ({v}, {g}); give one config, then its overrides (--config.KEY=VALUE)",
            f"error: --config is given 2 times ({v}, {v}); give one config, then its overrides (--config.KEY=VALUE)",
            "error: --config.train={...} replaces the whole group and --config.train.max_steps sets one of its keys; set them one by "
            "one, --config.train.KEY=VALUE",
            "error: --config.train.mesh={...} replaces the whole group and --config.train.mesh.data sets one of its keys; set them one "
            "by one, --config.train.mesh.KEY=VALUE",
            f"error: --workdir {tmp_path / 'a'} and --workdir {tmp_path / 'b'} name two runs' folders; give one"]
    for r, line in zip(cli_runs(runs), want):
        assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_override_value_of_another_type_says_what_the_key_takes():
    """--config.KEY=VALUE whose value is not of the key's type: one line saying what the key takes,
    as `--set` says it (config_flags said "('Non-boolean argument to boolean flag', 'yes')" and
    "invalid literal for int() with base 10: '1.5'"); absl's other true spellings still apply."""
    from helpers import cli_cases

    V = ["--config", "configs/vanilla.py:tiny"]
    cases = [V + ["--config.model.scan_layers=yes"], V + ["--config.model.vocab_size=1.5"], V + ["--config.train.lr=abc"],
             V + ["--config.model.n_layer", "x"], V + ["--config.model.scan_layers=false", "--config.model.n_layer", "3", "--json"]]
    want = ["error: --config.model.scan_layers=yes: model.scan_layers takes true or false\n",
            "error: --config.model.vocab_size=1.5: model.vocab_size takes an integer\n",
            "error: --config.train.lr=abc: train.lr takes a number\n", "error: --config.model.n_layer=x: model.n_layer takes an integer\n"]
    runs = cli_cases("llmjax.summary", cases)
    for r, line in zip(runs, want):
        assert (r.returncode, r.stderr) == (2, line), r.stderr
    assert (runs[-1].returncode, json.loads(runs[-1].stdout)["n_layer"]) == (0, 3), runs[-1].stderr


@pytest.mark.parametrize("given", ["--flagfile={flagfile}", "-config=configs/vanilla.py:tiny"])
def test_cli_override_after_a_config_given_in_absls_other_forms_applies(tmp_path, given):
    """An override after a --flagfile that holds --config, or after absl's one-dash -config: it
    applies, as it did before the check for a misplaced override (which refused it: 'give
    --config ... before it')."""
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text("--config=configs/vanilla.py:tiny\n")
    cmd = [sys.executable, "-m", "llmjax.summary", given.format(flagfile=flagfile), "--config.model.n_layer=3", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert json.loads(proc.stdout)["n_layer"] == 3


def test_cli_a_flagfile_or_one_dash_config_is_the_command_line(tmp_path):
    """Arguments read from a --flagfile, and absl's one-dash -config, are taken as the same arguments
    written on the command line: a get_config(variant) without a default gets 'default' (before:
    config_flags' 'get_config() missing 1 required positional argument' traceback on one line), an
    override is checked and the config validated at once, in the same one line ("'lrr' Did you mean
    "lr"..." before, and an unknown mesh axis was not refused), and a flagfile that cannot be read is
    one line."""
    from helpers import cli_cases

    needs = users_config(tmp_path / "needs.py", "def get_config(variant):\n    return make_config(variant, v.MODELS)\n")
    given = {"needs": [f"--config={needs}", "--json"],
             "lrr": ["--config=configs/vanilla.py:tiny", "--config.train.lrr=1"],
             "mesh": ["--config=configs/vanilla.py:tiny", "--config.train.mesh={'data': -1, 'fdsp': 4}"]}
    cases = []
    for name, args in given.items():
        (tmp_path / f"{name}.flags").write_text("".join(f"{a}\n" for a in args))
        cases += [args, [f"--flagfile={tmp_path / f'{name}.flags'}"]]
    cases += [[a[1:] if a.startswith("--config") else a for a in given["needs"]], [f"--flagfile={tmp_path / 'absent.flags'}"]]
    runs = cli_cases("llmjax.summary", cases)
    for i in range(len(given)):
        direct, from_file = runs[2 * i], runs[2 * i + 1]
        assert (from_file.returncode, from_file.stdout, from_file.stderr) == (direct.returncode, direct.stdout, direct.stderr), cases[2 * i]
    assert runs[0].returncode == 0 and json.loads(runs[0].stdout)["n_layer"] == 12, runs[0].stderr
    assert (runs[2].returncode, runs[2].stderr) == (2, "error: unknown config key 'train.lrr' (did you mean 'train.lr'?)\n")
    assert runs[4].returncode == 2 and runs[4].stderr.startswith("error: unknown config key 'train.mesh.fdsp'")
    assert (runs[6].returncode, runs[6].stdout, runs[6].stderr) == (0, runs[0].stdout, "")  # -config=needs.py
    assert runs[7].returncode == 2 and len(runs[7].stderr.splitlines()) == 1 and "absent.flags" in runs[7].stderr, runs[7].stderr


def test_cli_output_cut_short_by_its_reader_ends_quietly():
    """`python -m llmjax.summary ... | head -1`: the reader goes away; the tool stops with the shell's
    status for SIGPIPE (141) and no traceback (here the reader, `true`, has gone before the first write)."""
    script = f"{sys.executable} -m llmjax.summary --config configs/mla.py:tiny --json | true; echo status=${{PIPESTATUS[0]}}"
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stderr == "" and proc.stdout.strip() == "status=141", (proc.stdout, proc.stderr)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_help_to_a_standard_output_that_fails_is_quiet_or_named():
    """`--help | true` (the reader gone before the text) was 'error: [Errno 32] Broken pipe', exit
    status 2, and `--helpfull > /dev/full` 'error: [Errno 28] No space left on device': now quiet
    with 141, and a line that names standard output, exit status 1, as after any other text."""
    script = (f"{sys.executable} -m llmjax.summary --help | true; echo status=${{PIPESTATUS[0]}}; "
              f"{sys.executable} -m llmjax.summary --helpfull > /dev/full; echo status=$?")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["status=141", "status=1"], (proc.stdout, proc.stderr)
    assert proc.stderr == "error: standard output: No space left on device: a disk is full; make room and run again\n", proc.stderr


def test_the_trainers_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`python -m llmjax.train ... | head -1` whose reader has gone at a line the trainer says while
    it trains (here its first, all steps warmup): it was 'error: standard output: Broken pipe; no
    checkpoint was written', exit status 1, as if the run had failed; now quiet, 141, as other tools."""
    run = tmp_path / "run"
    script = (f"{sys.executable} -m llmjax.train --config=configs/vanilla.py:tiny --workdir={run} --config.train.max_steps=1 "
              f"--config.train.batch_size=8 --config.model.context_len=16 | true; echo status=${{PIPESTATUS[0]}}")
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stderr == "" and proc.stdout.strip() == "status=141", (proc.stdout, proc.stderr[-2000:])
    assert not run.exists()  # (a fresh run stopped before its first checkpoint is taken back)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_standard_output_on_a_full_disk_is_named(tmp_path, unbuffered):
    """`python -m llmjax.<tool> > /dev/full` (a full disk under `> out.txt`): the line said 'a file:
    No space left on device' (a write's OSError names no file), or, with stdout buffered until exit
    (no PYTHONUNBUFFERED), Python's 'Exception ignored in: <_io.TextIOWrapper ...>' and exit status
    120; the trainer blamed its workdir ('Make room or write access in runs/x'). Now one line that
    names standard output, exit status 1."""
    full = "error: standard output: No space left on device: a disk is full; make room and run again"
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    for tool, args, line in [
        ("summary", ["--config=configs/vanilla.py:tiny", "--json"], full),
        ("train", ["--config=configs/vanilla.py:tiny", f"--workdir={tmp_path / 'run'}", "--config.train.max_steps=1",
                   "--config.train.batch_size=8", "--config.model.context_len=16", "--config.eval.sample_tokens=0"],
         f"{full}; no checkpoint was written"),
    ]:
        with open("/dev/full", "w") as stdout:
            r = subprocess.run([sys.executable, "-m", f"llmjax.{tool}", *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=env, timeout=300)
        assert (r.returncode, r.stderr) == (1, line + "\n"), (tool, r.stderr[-2000:])
    assert not (tmp_path / "run").exists()  # (the trainer's fresh run, stopped before its first checkpoint, is taken back)


def test_a_path_one_may_not_enter_or_a_full_disk_is_one_line(tmp_path):
    """An OSError no tool words itself: a path under a folder the user may not enter (pathlib's
    exists() passes EACCES on: `sample --checkpoint=/root/x/run` was a PermissionError's traceback)
    and a full disk are one line, exit status 1 (cli.run). Root enters any folder, so the stat
    answers as the kernel does for another user; other OS errors keep their traceback."""
    locked = tmp_path / "locked"
    script = tmp_path / "tool.py"
    script.write_text(
        "import errno, os, sys\nfrom pathlib import Path\nfrom llmjax import cli\nimport llmjax.sample as S\n"
        f"locked, stat = {str(locked)!r}, Path.stat\n"
        "def denied(self, *a, **k):\n"
        "    if str(self).startswith(locked + os.sep):\n"
        "        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))\n"
        "    return stat(self, *a, **k)\n"
        "Path.stat = denied\n"
        "def full(*a, **k):\n"
        "    raise OSError(errno.ENOSPC if S.flags.FLAGS.prompt == 'full' else errno.EIO, 'No space left on device', 'runs/x/out')\n"
        "if '--prompt=x' not in sys.argv:\n"
        "    S.load = full\n"
        "S.define_flags()\ncli.run(S.main)\n")
    from helpers import cli_runs

    locked_run, full, other = cli_runs([(str(script), [f"--checkpoint={locked}/run", "--prompt=x"]),
                                        (str(script), ["--checkpoint=runs/x", "--prompt=full"]),
                                        (str(script), ["--checkpoint=runs/x", "--prompt=other"])])
    assert (locked_run.returncode, locked_run.stderr) == (
        1, f"error: {locked}/run: Permission denied (the user this runs as may not read or write there): choose another path, "
           "or change its permissions\n"), locked_run.stderr[-2000:]
    assert (full.returncode, full.stderr) == (1, "error: runs/x/out: No space left on device: a disk is full; make room and run "
                                                 "again\n"), full.stderr[-2000:]
    assert other.returncode == 1 and "Traceback" in other.stderr and "OSError: [Errno 5]" in other.stderr, other.stderr[-2000:]


def test_a_read_only_disk_or_a_used_up_quota_is_told_what_helps():
    """A read-only file system was told it was the user's permissions ('the user this runs as may not
    read or write there ... change its permissions', which no chmod mends), and a disk quota used up
    that 'a disk is full'."""
    from llmjax.cli import file_system_error

    def line(code):
        return file_system_error(OSError(code, os.strerror(code), "/mnt/ro/run"))

    assert line(errno.EROFS) == ("/mnt/ro/run: Read-only file system: nothing can be written on that disk; choose a path on "
                                 "another, or mount it read-write")
    assert line(errno.EDQUOT) == "/mnt/ro/run: Disk quota exceeded: your disk quota is used up; make room and run again"
    assert line(errno.EPERM).endswith("(the user this runs as may not read or write there): choose another path, or change its permissions")


def test_a_config_file_that_registers_its_own_architecture_loads(tmp_path):
    """A config file may define and register an architecture (try an idea in one file): the command
    line reads a config file two or three times, and the second run of its class statement was
    refused as "architecture 'myvanilla' is registered twice". The same statement run again replaces
    it; another class under a registered name is still refused."""
    from helpers import cli_runs, users_config
    from llmjax.registry import register

    path = users_config(tmp_path / "mine.py", (
        "from llmjax.registry import register\n"
        "from llmjax.models.vanilla import GPT2, VanillaConfig\n"
        "@register('myvanilla')\n"
        "class MyVanilla(GPT2):\n"
        "    config_class = VanillaConfig\n"
        "MODELS = v.MODELS\n"
        "def get_config(variant='tiny'):\n"
        "    cfg = make_config(variant, MODELS)\n"
        "    cfg.model.arch = 'myvanilla'\n"
        "    return cfg\n"))
    for r in cli_runs([("llmjax.summary", ["--config", str(path)]), ("llmjax.summary", ["--config", f"{tmp_path}/./mine.py"])]):
        assert r.returncode == 0 and "myvanilla" in r.stdout, r.stderr[-2000:]  # (the second: config_flags read it as typed)
    with pytest.raises(ValueError, match="architecture 'vanilla' is registered twice"):
        @register("vanilla")
        class Other(llmjax.ARCHS["vanilla"]):
            pass
    assert llmjax.ARCHS["vanilla"].__name__ == "GPT2"


def test_a_colon_in_a_config_path_and_a_newline_in_a_value_are_one_line(tmp_path):
    """A config path with ':' in a folder's name said that its part before the ':' was not found; a
    value with a newline split the error line in two. (One --config.KEY given twice is absl's: the
    last wins, as a flagfile's defaults overridden on the command line need, and compare's --set.)"""
    import shutil

    from helpers import cli_runs

    (tmp_path / "a:b").mkdir()
    shutil.copy(ROOT / "configs" / "vanilla.py", tmp_path / "a:b" / "m.py")
    runs = [("llmjax.summary", ["--config", f"{tmp_path}/a:b/m.py:tiny"]), ("llmjax.summary", ["--config", f"{tmp_path}/a:b/m.py"]),
            ("llmjax.summary", ["--config", "configs/vanilla.py:tiny", "--config.model.dtype=float32\n"])]
    colon = (f"error: config file '{tmp_path}/a:b/m.py' has ':' in its path, which separates a config's variant (path:variant); move or "
             "link it to a path without one\n")
    want = [colon, colon,
            "error: model.dtype='float32\\n' is not one of float32, bfloat16, float16 (did you mean 'float32'?)\n"]
    for r, line in zip(cli_runs(runs), want):
        assert (r.returncode, r.stderr) == (2, line), r.stderr[-2000:]
    from llmjax.tokenizer import TokenizerError, from_description

    with pytest.raises(TokenizerError, match=r"^character tokenizer: vocab_size '3' but 3 characters$"):  # (it read "vocab_size 3 but 3")
        from_description({"kind": "char", "chars": "abc", "vocab_size": "3"})
