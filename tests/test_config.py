from pathlib import Path

import pytest

from illume.config import ConfigError, RunConfig, load_config, save_config

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
    from illume.pretrain import demo_model_dir

    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == home / ".cache" / "illume"


def test_xdg_cache_home_moves_the_cache(home, tmp_path, monkeypatch):
    from illume.pretrain import demo_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == tmp_path / "xdg" / "illume"


def test_illume_cache_wins_over_xdg_cache_home(home, tmp_path, monkeypatch):
    from illume.pretrain import demo_model_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    assert demo_model_dir(load_config(CONFIGS / "demo.yaml")).parent == tmp_path / "mine"


def test_model_cache_dir_setting_wins_over_the_environment(home, tmp_path, monkeypatch):
    from illume.pretrain import demo_model_dir

    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    cfg = load_config(CONFIGS / "demo.yaml", [f"model.cache_dir={tmp_path / 'chosen'}"])
    assert demo_model_dir(cfg).parent == tmp_path / "chosen"


def test_saved_config_does_not_bake_in_the_machine_cache_path(home, tmp_path, monkeypatch):
    monkeypatch.setenv("ILLUME_CACHE", str(tmp_path / "mine"))
    save_config(load_config(CONFIGS / "demo.yaml"), tmp_path / "config.yaml")
    assert "mine" not in (tmp_path / "config.yaml").read_text()
    assert load_config(tmp_path / "config.yaml").model.cache_dir is None
