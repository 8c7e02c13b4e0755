import re
from dataclasses import asdict
from pathlib import Path

import pytest

from illume.config import ConfigError, RunConfig, dotted_keys, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "demo.yaml", ["sample.temperatures=[0.5,1.0]", "pretrain.learning_rate=5e-4",
                                              "data.max_train_examples=7"])
    assert cfg.sample.temperatures == [0.5, 1.0]
    assert cfg.pretrain.learning_rate == 5e-4  # a float, though YAML 1.1 would read "5e-4" as a string
    assert cfg.data.max_train_examples == 7


@pytest.mark.parametrize("override, named", [
    ("model.lm.hidden_sise=64", "model.lm.hidden_sise"),
    ("sample.batch_size=many", "sample.batch_size"),
    ("data.kind=coco", "data.kind"),
    ("nonsense=1", "nonsense"),
])
def test_bad_override_names_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(CONFIGS / "demo.yaml", [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sample:\n  temperature: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*sample\.temperature"):
        load_config(path)


def test_wrong_type_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pretrain:\n  num_steps: lots\n")
    with pytest.raises(ConfigError, match=r"pretrain\.num_steps"):
        load_config(path)


def test_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["sample.batch_size"])


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["name=x", "sample.seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# --- the per-user model cache ------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh home folder and none of the cache variables set."""
    for name in ("ILLUME_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_demo_model_is_cached_under_the_home_folder_by_default(home):
    from illume.demo.pretrain import demo_model_dir

    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == home / ".cache" / "illume"


def test_xdg_cache_home_moves_the_cache(home, tmp_path, monkeypatch):
    from illume.demo.pretrain import demo_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == tmp_path / "xdg" / "illume"


def test_illume_cache_wins_over_xdg_cache_home(home, tmp_path, monkeypatch):
    from illume.demo.pretrain import demo_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == tmp_path / "mine"


def test_model_cache_dir_setting_wins_over_the_environment(home, tmp_path, monkeypatch):
    from illume.demo.pretrain import demo_model_dir

    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    cfg = load_config(CONFIGS / "demo.yaml", [f"model.cache_dir={tmp_path / 'chosen'}"])
    assert demo_model_dir(cfg).parent == tmp_path / "chosen"


def test_saved_config_does_not_bake_in_the_machine_cache_path(home, tmp_path, monkeypatch):
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    save_config(load_config(CONFIGS / "demo.yaml"), tmp_path / "config.yaml")
    assert "mine" not in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").model.cache_dir is None


def test_a_config_with_a_base_states_only_what_differs(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: parent\nsample: {temperatures: [0.5], seed: 3}\n"
                                          "train: {num_epochs: 2}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nname: child\nsample: {seed: 4}\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["train.num_epochs=5"])
    # The base first, then the file (nested mappings merge key by key), then the overrides.
    assert (cfg.name, cfg.sample.temperatures, cfg.sample.seed, cfg.train.num_epochs) == ("child", [0.5], 4, 5)
    save_config(cfg, tmp_path / "resolved.yaml")  # the saved config is resolved: no base key, loads alone
    assert not re.search(r"^base:", (tmp_path / "resolved.yaml").read_text(), re.M)  # the key, not a word
    assert load_config(tmp_path / "resolved.yaml", ["train.num_epochs=5"]) == cfg


def test_a_missing_or_circular_base_names_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"config file not found: .*nowhere\.yaml \(the base of .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: [b.yaml]\n")
    with pytest.raises(ConfigError, match="must be the path of another config file"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize("variant", sorted(p.name for p in CONFIGS.glob("demo_*.yaml")))
def test_demo_variants_state_only_what_differs_from_demo_yaml(variant):
    """Each demo variant names demo.yaml (or another demo: demo_hf_grpo.yaml's is demo_hf.yaml) as its base and
    repeats none of the values it would get from it."""
    from omegaconf import OmegaConf

    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / variant))
    base_name = own.pop("base")
    assert base_name == "demo.yaml" or variant == "demo_hf_grpo.yaml" and base_name == "demo_hf.yaml", base_name
    base = dotted_keys(asdict(load_config(CONFIGS / base_name)))
    repeated = {key: value for key, value in dotted_keys(own).items() if base[key] == value}
    assert not repeated, f"{variant} repeats what {base_name} already resolves to: {repeated}"


# Every numeric setting is checked for its range when the config loads (illume.config.check_ranges), so a
# value outside its meaning fails before any work, naming the key, the value and what is allowed.
@pytest.mark.parametrize("override, message", [
    ("loop.num_rounds=-1", "loop.num_rounds must be >= 1, got -1"),
    ("loop.num_rounds=0", "loop.num_rounds must be >= 1, got 0"),
    ("loop.patience=0", "loop.patience must be >= 1, got 0"),
    ("critic.threshold=1.5", "critic.threshold must be in [0, 1], got 1.5"),
    ("critic.poll_seconds=0", "critic.poll_seconds must be > 0, got 0"),
    ("sample.temperatures=[0.3,-1]", "sample.temperatures[1] must be >= 0, got -1"),
    ("sample.temperatures=[]", "sample.temperatures is empty"),
    ("sample.samples_per_temperature=0", "sample.samples_per_temperature must be >= 1, got 0"),
    ("sample.top_p=1.5", "sample.top_p must be in (0, 1], got 1.5"),
    ("sample.batch_size=0", "sample.batch_size must be >= 1, got 0"),
    ("train.learning_rate=0", "train.learning_rate must be > 0, got 0"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number, got nan"),
    ("train.adam_beta2=1.0", "train.adam_beta2 must be in [0, 1), got 1.0"),
    ("train.bf16=true", None),  # alone it is fine
    ("policy.grpo.epsilon=1.0", "policy.grpo.epsilon must be in (0, 1), got 1.0"),
    ("policy.grpo.num_generations=1", "policy.grpo.num_generations must be >= 2, got 1"),
    ("policy.grpo.reward_sources.simulated=inf", "policy.grpo.reward_sources.simulated must be a finite number, got inf"),
    ("reward.heldout_fraction=1.0", "reward.heldout_fraction must be in (0, 1), got 1.0"),
    ("reward.target_precision=0", "reward.target_precision must be in (0, 1], got 0"),
    ("judge.batch_size=0", "judge.batch_size must be >= 1, got 0"),
    ("judge.threshold=0.5", "judge.threshold must be <= 0 for judge.method=likelihood"),
    ("annotate.port=70000", "annotate.port must be in [1, 65535], got 70000"),
    ("annotate.annotations_per_item=0", "annotate.annotations_per_item must be >= 1, got 0"),
    ("annotate.lease_seconds=-5", "annotate.lease_seconds must be > 0, got -5"),
    ("annotate.max_body_bytes=10", "annotate.max_body_bytes must be >= 1024, got 10"),
    ("data.max_train_examples=0", "data.max_train_examples must be >= 1, got 0"),
    ("data.shapes.num_train_scenes=0", "data.shapes.num_train_scenes must be >= 1, got 0"),
    ("pretrain.caption_fraction=0.95", "pretrain.caption_fraction + pretrain.generic_fraction must be <= 1"),
    ("model.lora.dropout=1", "model.lora.dropout must be in [0, 1), got 1"),
    ("model.lm.num_layers=0", "model.lm.num_layers must be >= 1, got 0"),
    ("model.vision.layers=[1,0,1,1]", "model.vision.layers[1] must be >= 1, got 0"),
    ("judge.model={kind: hf, lora: {r: 0}}", "judge.model.lora.r must be >= 1, got 0"),
    ("sample.pool=[{round: -1}]", "sample.pool[0].round must be >= 0, got -1"),
])
def test_settings_outside_their_range_fail_naming_key_value_and_range(override, message):
    if message is None:
        load_config(CONFIGS / "demo.yaml", [override])
        return
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "demo.yaml", [override])
    assert message in str(error.value)


def test_mixed_precisions_together_are_refused():
    with pytest.raises(ConfigError, match="train.bf16 and train.fp16 are both true"):
        load_config(CONFIGS / "demo.yaml", ["train.bf16=true", "train.fp16=true"])


# Settings any value of which means something: seeds (any integer) and the free-form judge threshold of
# `likelihood` (checked against the method in JudgeConfig). Every other numeric setting must have a range.
ANY_VALUE = {"seed", "pretrain_seed", "threshold", "reward_sources"}


def _numeric_fields(section, at=""):
    from dataclasses import fields, is_dataclass

    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            yield from _numeric_fields(value, f"{at}{f.name}.")
        elif f.type in ("int", "float", "int | None", "float | None", "list[int]", "list[float]"):
            yield f"{at}{f.name}", type(section), f.name


def test_every_numeric_setting_has_a_range():
    cfg = load_config(CONFIGS / "demo.yaml", ["judge.model={kind: magma}"])
    missing = [key for key, owner, name in _numeric_fields(cfg)
               if name not in ANY_VALUE and name not in getattr(owner, "RANGES", {})]
    assert not missing, f"numeric settings without a range in their class's RANGES: {missing}"


@pytest.mark.parametrize("override", ["loop.num_rounds=-1", "critic.threshold=1.5", "sample.batch_size=0"])
def test_a_setting_out_of_range_fails_before_anything_is_written(tmp_path, capsys, override):
    """Issue 24: `loop.num_rounds=-1` scored the base model and printed a results.json that did not exist."""
    from illume.cli import main

    assert main(["run", str(CONFIGS / "demo.yaml"), f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and err.count("\n") == 1
    assert not any(tmp_path.iterdir())  # no run folder, no config.yaml


# --- one section per preference algorithm; kinds as Literals; renamed keys -----------------------------------


def test_kinds_are_the_registries_keys():
    """A wrong critic.kind or policy.kind fails at load (a Literal); the Literals name exactly what the
    registries hold, so adding a kind is its module, its registry entry and its name here."""
    from typing import get_args, get_type_hints

    from illume.config import CriticConfig, PolicyConfig
    from illume.critic_registry import CRITICS
    from policies.registry import POLICIES

    assert set(get_args(get_type_hints(PolicyConfig)["kind"])) == set(POLICIES)
    assert set(get_args(get_type_hints(CriticConfig)["kind"])) == set(CRITICS)
    for override, named in (("critic.kind=oracle", "critic.kind"), ("policy.kind=ppo", "policy.kind")):
        with pytest.raises(ConfigError, match=rf"key '{named}'.*'{override.split('=')[1]}'"):
            load_config(CONFIGS / "demo.yaml", [override])


OLD_POLICY = {"kind": "grpo", "loss_type": "sigmoid", "beta": 0.04, "label_smoothing": 0.0, "sft_weight": 1.0,
              "answer_weight": 1.0, "reference_as_chosen": False, "rounds": "latest", "desirable_weight": 1.0,
              "undesirable_weight": None, "learning_rate": 3e-4, "seed": 0, "num_generations": 8,
              "grpo_temperature": 0.8, "grpo_loss_type": "dr_grpo", "epsilon": 0.2, "grpo_iterations": 1,
              "grpo_scale_rewards": True, "grpo_baseline": "group", "grpo_answer_weight": 0.5,
              "reward_sources": {"reward_model": 1.0}}
"""A run's policy section as config.yaml held it before the per-algorithm sections (a GRPO run)."""


@pytest.mark.parametrize("key", [key for key in OLD_POLICY if key not in ("kind", "rounds", "learning_rate", "seed")])
def test_a_renamed_policy_key_is_refused_with_its_new_name(tmp_path, key):
    from illume.config import RENAMED_POLICY_KEYS

    new = [f"policy.{name}" for name in RENAMED_POLICY_KEYS[key].values()]
    with pytest.raises(ConfigError, match=rf"'policy\.{key}' was renamed.*did you mean {re.escape(new[0])}"):
        load_config(CONFIGS / "demo.yaml", [f"policy.{key}=1"])
    path = tmp_path / "mine.yaml"
    path.write_text(f"policy:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"mine\.yaml: key 'policy\.{key}' was renamed"):
        load_config(path)


def test_an_unknown_key_names_the_known_keys_close_to_it():
    with pytest.raises(ConfigError, match=r"'policy\.bta'.*did you mean .*policy\.dpo\.beta"):
        load_config(CONFIGS / "demo.yaml", ["policy.bta=0.2"])


def _old_run_config(tmp_path, policy: dict) -> Path:
    from omegaconf import OmegaConf

    cfg = load_config(CONFIGS / "demo_grpo.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    saved["policy"] = policy
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    return tmp_path / "config.yaml"


def test_a_run_folder_written_before_the_rename_loads_and_resumes_unchanged(tmp_path):
    """A run's config.yaml that illume wrote with the flat keys is read with each moved into the section of
    the run's policy.kind, so the run continues with today's demo_grpo.yaml and nothing counts as changed."""
    from illume.config import load_run_config
    from illume.resume import setting_changes

    old = load_run_config(_old_run_config(tmp_path, OLD_POLICY))
    grpo = old.policy.grpo
    assert (grpo.beta, grpo.accepted_weight, grpo.iterations, grpo.answer_weight) == (0.04, 1.0, 1, 0.5)
    assert old.policy.dpo == type(old.policy.dpo)() and old.policy.kto == type(old.policy.kto)()
    today = load_config(CONFIGS / "demo_grpo.yaml", ["policy.grpo.accepted_weight=1.0", "policy.grpo.iterations=1",
                                                      "policy.grpo.answer_weight=0.5"])
    assert setting_changes(old, today, finished_rounds=1) == {}
    # A DPO run's sft_weight was DPO's; answer_weight its own.
    dpo = load_run_config(_old_run_config(tmp_path, {**OLD_POLICY, "kind": "dpo", "beta": 0.3, "sft_weight": 0.5}))
    assert (dpo.policy.dpo.beta, dpo.policy.dpo.sft_weight, dpo.policy.grpo.beta) == (0.3, 0.5, 0.1)
    # A user's own file with the old keys is refused, not moved.
    with pytest.raises(ConfigError, match="was renamed"):
        load_config(tmp_path / "config.yaml")


# --- one word per thing (issue 26): people are `person`; renamed keys and values ------------------------------


def test_the_renamed_keys_name_todays_keys():
    """Every old key is gone from RunConfig and its new name is there; every renamed value's key is today's."""
    from illume.config import RENAMED_KEYS, RENAMED_VALUES

    known = set(dotted_keys(asdict(RunConfig())))
    assert not set(RENAMED_KEYS) & known and set(RENAMED_KEYS.values()) <= known
    assert set(RENAMED_VALUES) <= known


@pytest.mark.parametrize("override, message", [
    ("critic.kind=human", r"key 'critic\.kind': the value 'human' was renamed: did you mean critic\.kind=person\?"),
    ("critic.people_kind=human",
     r"key 'critic\.people_kind': the value 'human' was renamed: did you mean critic\.people_kind=person\?"),
    ("critic.people=simulated", r"key 'critic\.people' was renamed: did you mean critic\.people_kind\?"),
    ("reward.human_rounds=2", r"key 'reward\.human_rounds' was renamed: did you mean reward\.people_rounds\?"),
    ("judge.human_rounds=0", r"key 'judge\.human_rounds' was renamed: did you mean judge\.people_rounds\?"),
])
def test_an_old_name_in_a_new_config_is_refused_with_the_new_one(tmp_path, override, message):
    with pytest.raises(ConfigError, match=rf"overrides .*{message}"):
        load_config(CONFIGS / "demo.yaml", [override])
    key, value = override.split("=")
    section, name = key.split(".")
    path = tmp_path / "mine.yaml"
    path.write_text(f"base: {CONFIGS / 'demo.yaml'}\n{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"mine\.yaml: {message}"):
        load_config(path)


def test_a_run_folder_with_human_critics_loads_with_person_and_resumes_unchanged(tmp_path):
    """A run's config.yaml that illume wrote before people were `person` everywhere (critic.kind: human,
    critic.people: human, *.human_rounds) is read with today's names and values, and today's config with the new
    names counts as the same run; the same file given as a new config is refused."""
    from omegaconf import OmegaConf

    from illume.config import load_run_config
    from illume.resume import setting_changes

    save_config(load_config(CONFIGS / "demo.yaml"), tmp_path / "config.yaml")
    saved = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    saved["critic"]["kind"] = "human"
    saved["critic"]["people"] = saved["critic"].pop("people_kind")
    saved["critic"]["people"] = "human"
    saved["reward"]["human_rounds"] = saved["reward"].pop("people_rounds") + 1
    saved["judge"]["human_rounds"] = saved["judge"].pop("people_rounds") + 3
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))

    old = load_run_config(tmp_path / "config.yaml")
    assert (old.critic.kind, old.critic.people_kind) == ("person", "person")
    assert (old.reward.people_rounds, old.judge.people_rounds) == (2, 3)
    today = load_config(CONFIGS / "demo.yaml", ["critic.kind=person", "critic.people_kind=person",
                                                "reward.people_rounds=2", "judge.people_rounds=3"])
    assert setting_changes(old, today, finished_rounds=1) == {}
    # A run that kept a simulated critic keeps it.
    saved["critic"]["kind"], saved["critic"]["people"] = "simulated", "simulated"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    assert (load_run_config(tmp_path / "config.yaml").critic.people_kind) == "simulated"
    with pytest.raises(ConfigError, match="was renamed"):
        load_config(tmp_path / "config.yaml")
