"""Property test: whatever dict (or YAML file) is thrown at `load_recipe`, it returns a valid `Recipe` or raises
`RecipeError` with a message, never a KeyError, TypeError, AttributeError, a foreign ValueError or a crash.

The dicts mix the recipe's field names, the original MixtureKit's keys and junk, with values of random types and
nested expert lists of random shapes; a third of them start from a valid recipe and are mutated, so both outcomes
are exercised. Every recipe that loads must also survive `to_dict()` and `to_yaml()` round trips unchanged.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import get_args

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import ModelSource, Recipe, RecipeError, load_recipe
from moekit.recipe.legacy import LEGACY_KEYS, PASSTHROUGH_KEYS

RECIPE_FIELDS = sorted(Recipe.model_fields)
METHODS = get_args(Recipe.model_fields["method"].annotation)  # what the recipe accepts, read off its type
DTYPES = get_args(Recipe.model_fields["dtype"].annotation)
SOURCE_FIELDS = sorted(ModelSource.model_fields)
LEGACY_FIELDS = sorted(LEGACY_KEYS | PASSTHROUGH_KEYS)
LEGACY_EXPERT_FIELDS = ["expert_name", "model_id"]
# Derandomized: the same examples on every run, so the outcome counts asserted below cannot drift between CI runs.
SETTINGS = settings(max_examples=600, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------------------------
# Values: plausible ones for each field, and anything at all.
# ---------------------------------------------------------------------------------------------------------------

WORDS = st.sampled_from([
    *METHODS, *DTYPES, "mixtral", "2GB", "500MiB", "1.5GB", "0B", "-1MB", "9" * 40 + "GB", "random", "zeros",
    "hidden", "average", "base", "mlp.up_proj", "up_proj", "self_attn.q_proj", "mlp.w9", "../up", "a/b", ".", "",
    "  ", "e0", "e1", "hub", "yes", "null", "1e400", "nan", "-0",
])
ATOMS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 8), st.integers(), st.floats(), st.just(math.nan), st.just(math.inf),
    st.text(max_size=12), WORDS, st.binary(max_size=4),
)
ANY = st.recursive(
    ATOMS, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.sets(st.integers(-2, 4), max_size=3),
        st.dictionaries(st.text(max_size=6) | WORDS, inner, max_size=4),
    ), max_leaves=10,
)
NAMES = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,8}", fullmatch=True), st.text(max_size=8),
                  st.sampled_from(["e0", "e1", "e2", "../x", "a.b", "a/b", "-x", "_x"]))
SOURCES = st.one_of(st.text(max_size=12), st.sampled_from(["./m", "org/model", "x.gguf", "/tmp", "~/m", " "]))
INDICES = st.lists(st.integers(-2, 8), max_size=4)
FLOATS = st.one_of(st.floats(), st.integers(-2, 3), st.sampled_from([0.0, 0.01, 0.5, 1.0]))

OUR_EXPERT = st.fixed_dictionaries(
    {"name": NAMES, "source": SOURCES}, optional={"revision": st.text(max_size=6) | ANY, "gguf_file": st.text(max_size=6) | ANY}
)
LEGACY_EXPERT = st.fixed_dictionaries({"model_id": SOURCES | ANY}, optional={"expert_name": NAMES | ANY})
RANDOM_EXPERT = st.dictionaries(st.sampled_from(SOURCE_FIELDS + LEGACY_EXPERT_FIELDS) | st.text(max_size=8),
                                NAMES | SOURCES | ANY, max_size=5)
EXPERT = st.one_of(OUR_EXPERT, OUR_EXPERT, LEGACY_EXPERT, RANDOM_EXPERT, ANY)
EXPERTS = st.one_of(st.lists(EXPERT, max_size=5), st.lists(OUR_EXPERT, min_size=2, max_size=4),
                    st.lists(LEGACY_EXPERT, min_size=1, max_size=4), ANY)

PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "method": st.sampled_from(METHODS) | WORDS, "moe_method": st.sampled_from(METHODS) | WORDS,
    "experts": EXPERTS, "base": OUR_EXPERT | LEGACY_EXPERT | RANDOM_EXPERT,
    "base_as_expert": st.booleans(), "allow_pickle": st.booleans(), "auto_map": st.booleans(),
    "shared_weights": st.sampled_from(["average", "base", "mean"]),
    "shared_expert": st.sampled_from(["base", "none", "bsae"]) | st.none(), "shared_expert_gate": st.booleans(),
    "num_experts_per_tok": st.integers(-1, 6), "router_layers": st.lists(WORDS, max_size=3),
    "router_layers_index": INDICES, "stitch_layers_index": INDICES, "stitch_freq": st.integers(-1, 6),
    "router_init": st.sampled_from(["random", "zeros", "hidden"]), "router_init_std": FLOATS, "alpha": FLOATS,
    "stitch_dropout": FLOATS, "dtype": st.sampled_from(DTYPES) | WORDS, "output": SOURCES,
    "shard_size": st.integers(-5, 10**10) | WORDS, "seed": st.integers(), "hub": NAMES,
    "model_type": NAMES | SOURCES,
}
KEYS = st.one_of(st.sampled_from(RECIPE_FIELDS), st.sampled_from(LEGACY_FIELDS), st.text(max_size=10),
                 st.sampled_from(["Method", "expert", "num_expert_per_tok", "experts ", "", "model_ids", "name",
                                  "source", "expert_name", "__class__", "__metadata__"]))


def value_for(key: str) -> st.SearchStrategy:
    plausible = PLAUSIBLE.get(key)
    return ANY if plausible is None else st.one_of(plausible, plausible, ANY)


VALID = [
    {"method": "traditional", "experts": [{"name": "a", "source": "./a"}, {"name": "b", "source": "org/b"}]},
    {"method": "btx", "experts": [{"name": "a", "source": "./a"}, {"name": "b", "source": "./b"},
                                  {"name": "c", "source": "./c"}], "num_experts_per_tok": 2,
     "router_layers": ["mlp.up_proj"], "router_layers_index": [0, 1], "alpha": 0.1, "shard_size": "1GB"},
    {"method": "bts", "base": {"name": "hub", "source": "./h"}, "experts": [{"name": "a", "source": "./a"}],
     "stitch_freq": 2, "stitch_dropout": 0.1},
    {"moe_method": "btx", "model_type": "mymoe", "num_experts_per_tok": 1, "alpha": 0.0, "router_layers_index": [],
     "router_layers": ["mlp.gate_proj"], "experts": [{"expert_name": "x", "model_id": "org/x"},
                                                     {"expert_name": "y", "model_id": "./y"}]},
    {"moe_method": "bts", "stitch_freq": 1, "experts": [{"expert_name": "hub", "model_id": "./h"},
                                                        {"model_id": "./e"}]},
]


@st.composite
def random_recipes(draw) -> dict:
    """A dict of random keys (valid, original-MixtureKit or junk) and values of random types."""
    data: dict = {}
    if draw(st.integers(0, 3)):
        key = draw(st.sampled_from(["method", "moe_method"]))
        data[key] = draw(value_for(key))
    if draw(st.integers(0, 5)):
        data["experts"] = draw(EXPERTS)
    for key in draw(st.lists(KEYS, max_size=6)):
        data[key] = draw(value_for(key))
    if draw(st.integers(0, 29)) == 0:
        data[draw(st.integers() | st.none() | st.tuples(st.integers()))] = draw(ATOMS)  # a key that is no string
    return data


@st.composite
def mutated_recipes(draw) -> dict:
    """A valid recipe with a few keys added, removed or given other values."""
    data = dict(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2]))):
        action = draw(st.sampled_from(["set", "set", "drop", "expert"]))
        if action == "drop" and data:
            data.pop(draw(st.sampled_from(sorted(data))))
        elif action == "expert" and isinstance(data.get("experts"), list):
            experts = list(data["experts"])
            experts.insert(draw(st.integers(0, len(experts))), draw(EXPERT))
            data["experts"] = experts
        else:
            key = draw(st.sampled_from(sorted(PLAUSIBLE)) | KEYS)
            data[key] = draw(PLAUSIBLE[key] if key in PLAUSIBLE and draw(st.booleans()) else value_for(key))
    return data


RECIPES = st.one_of(random_recipes(), mutated_recipes())


def check(data) -> str:
    """load_recipe returns a Recipe that round-trips, or raises RecipeError; anything else fails the test."""
    try:
        recipe = load_recipe(data)
    except RecipeError as error:
        assert str(error).strip(), "an empty error message"
        return "error"
    assert isinstance(recipe, Recipe)
    assert load_recipe(recipe.to_dict()) == recipe
    assert load_recipe(yaml.safe_load(recipe.to_yaml())) == recipe
    return "recipe"


def test_random_recipe_dicts_load_or_raise_recipe_error():
    outcomes: Counter = Counter()

    @SETTINGS
    @given(RECIPES)
    def run(data):
        outcomes[check(data)] += 1

    run()
    assert sum(outcomes.values()) >= 500, outcomes
    # Both outcomes must be common, or the generator tests only one path.
    assert outcomes["recipe"] >= 20 and outcomes["error"] >= 300, outcomes


YAML_TEXT = st.one_of(
    RECIPES.map(lambda data: yaml.safe_dump(data, allow_unicode=True) if _dumpable(data) else "{}"),
    st.text(max_size=80),
    st.sampled_from(["method: btx\nseed: 2020-99-99\n", "alpha: !!float abc\n", "[" * 3000, "experts: &x [*x]\n",
                     "- a\n- b\n", "", "~", "method: !!python/object:os.system x\n", "a: {b: [c, {d: e}]}\n"]),
)


def _dumpable(data) -> bool:
    try:
        yaml.safe_dump(data)
    except (yaml.YAMLError, TypeError, ValueError, RecursionError):
        return False
    return True


def test_random_yaml_files_load_or_raise_recipe_error():
    outcomes: Counter = Counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"

        @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(YAML_TEXT | st.binary(max_size=40))
        def run(text):
            if isinstance(text, bytes):
                path.write_bytes(text)
            else:
                path.write_text(text, encoding="utf-8")
            outcomes[check(path)] += 1

        run()
    assert sum(outcomes.values()) >= 150 and outcomes["error"] > 0, outcomes


@settings(max_examples=150, deadline=None, database=None)
@given(st.one_of(st.text(), st.text(min_size=300, max_size=5000), st.sampled_from(
    ["x" * 5000, "a/" * 3000, "a\x00b", "/etc", "/dev/null", ".", "", "~", "tests", "/proc/self/mem"])))
def test_random_recipe_paths_load_or_raise_recipe_error(text):
    """A string is a recipe file's path: missing, a folder, too long, unreadable: always a RecipeError."""
    assert check(text) in ("recipe", "error")
