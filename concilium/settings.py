"""Where things are: read from the environment (CONCILIUM_*). What routes where lives in the policy."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCILIUM_", extra="ignore")

    policy: str = "policies/default.yaml"
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None  # unset = embedded mode (no external services)
    data_dir: str = "var"  # local state when Redis is absent (feedback, keys, jobs)
    policy_watch_s: float = 1.0  # poll interval for policy file changes; 0 disables
    log_level: str = "info"
    log_prompts: bool = False  # prompt text never reaches logs unless turned on
    keys_file: str | None = None  # the key file `concilium keys` writes (default: <data_dir>/keys.yaml)
    guard_store: str = "auto"  # budgets and rate limits: "auto" (Redis when redis_url is set) or "memory"

    @property
    def key_file_path(self) -> str:
        return self.keys_file or f"{self.data_dir}/keys.yaml"
