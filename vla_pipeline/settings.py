"""Every `VLA_*` environment variable, read in one place (pydantic-settings).

`settings()` reads the environment afresh on each call (cheap), so a changed variable is seen by
the next command or run. A bad value fails with the variable's name and what it accepts.
Defaults that are facts of a stage (the backbone hub id, the registered model's name) stay in
that stage: an unset variable is None here and the stage's own default applies.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A VLA_* variable with a value it cannot take; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLA_", extra="ignore", frozen=True)

    episodes_dir: Path = Field(Path("data/episodes"), description="drop folder of HDF5 episodes")
    store: str = Field("data/store.zarr", description="the Zarr window store: a folder, or an fsspec URL to read")
    models: Path = Field(Path("data/models"), description="training output folders (lora-<fingerprint>/)")
    model: str | None = Field(None, description="backbone: cpu (the CPU preset), a hub id or a save_pretrained "
                                                "folder; unset: microsoft/kosmos-2-patch14-224")
    registered_model: str | None = Field(None, description="the registered model's name; unset: mobile-vla")
    retrain_cron: str = Field("0 2 * * *", description="when retrain_schedule looks for new data (UTC)")
    retrain_min_episodes: int = Field(1, ge=1, description="new, changed or removed episodes needed to retrain")
    artifact_root: str | None = Field(None, description="where new MLflow experiments keep artifacts (any URL)")
    cache: Path | None = Field(None, description="cache folder (batch-probe answers); unset: ~/.cache/vla_pipeline")
    tiny_backbone: Path | None = Field(None, description="where the tiny test backbone is built once")
    small_backbone: Path | None = Field(None, description="where the CPU preset's backbone is built once")
    grounded_backbone: Path | None = Field(None, description="where the grounded small backbone is built once")
    serve_api_key: SecretStr | None = Field(None, description="the key `vla-pipeline serve` asks robots for "
                                                              "(Authorization: Api-Key <key>), and its clients send")

    @property
    def serve_api_key_value(self) -> str | None:
        return self.serve_api_key.get_secret_value() if self.serve_api_key else None


def settings() -> Settings:
    """The current VLA_* settings; SettingsError (one line per bad variable) on a bad value."""
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(f"VLA_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
        raise SettingsError(problems) from None
