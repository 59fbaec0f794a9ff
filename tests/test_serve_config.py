"""ServeConfig: the request-path settings compose with secure defaults and refuse bad values in one
line naming the setting (no server started)."""
from __future__ import annotations

import pytest

from spava_plan.errors import ConfigError
from spava_plan.entry.run_config import compose_entry_config, data_url_bytes


def test_the_defaults_are_secure(monkeypatch):
    monkeypatch.delenv("SPAVA_API_KEY", raising=False)
    cfg = compose_entry_config("serve", ["model=tiny"])
    assert cfg.host == "127.0.0.1" and cfg.api_key is None and cfg.allowed_origins == []
    assert cfg.allowed_media_domains == [] and cfg.allow_private_media is False
    assert cfg.allowed_local_media_path is None
    assert cfg.max_video_bytes == 256 * 2 ** 20
    # A max_video_bytes data: URL fits the body cap: base64 is 4 bytes per 3, plus the JSON around it.
    assert cfg.max_body_bytes == data_url_bytes(cfg.max_video_bytes) >= cfg.max_video_bytes * 4 // 3 + 2 ** 20
    assert cfg.warmup_plans >= 1 and cfg.prefetch == 1


def test_the_api_key_comes_from_the_environment_and_folders_resolve(monkeypatch, tmp_path):
    monkeypatch.setenv("SPAVA_API_KEY", "from-the-env-123")
    (tmp_path / "videos").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "videos")
    cfg = compose_entry_config("serve", ["model=tiny", f"allowed_local_media_path={tmp_path / 'link'}",
                                         "allowed_media_domains=[Videos.Example.com.]"])
    assert cfg.api_key == "from-the-env-123"
    assert cfg.allowed_local_media_path == str((tmp_path / "videos").resolve())  # checked as its real path
    assert cfg.allowed_media_domains == ["videos.example.com"]


@pytest.mark.parametrize("override, match", [
    ("api_key=short", "api_key: must be at least 8"),
    ("allowed_media_domains=[http://x.com/a]", "allowed_media_domains: lists host names"),
    ("allowed_origins=[x.com]", "allowed_origins: lists origins"),
    ("allowed_local_media_path=/no/such/folder", "allowed_local_media_path: must be an existing folder"),
    ("allowed_local_media_path=/", "allowed_local_media_path: must not be the root"),
    ("max_video_bytes=0", "max_video_bytes: must be within"),
    ("max_body_bytes=10", "max_body_bytes: must be within"),
    ("media_timeout=0", "media_timeout: must be a number of seconds"),
    ("header_timeout=inf", "header_timeout"),
    ("read_timeout=-1", "read_timeout: must be a number of seconds"),
    ("max_connections=1", "max_connections: must be within"),
    ("max_pixels=0", "max_pixels: must be within"),
    ("max_frames=0", "max_frames: must be within"),
    ("warmup_plans=-1", "warmup_plans: must be within"),
    ("prefetch=99", "prefetch: must be within"),
    ("keep_alive_timeout=0", "keep_alive_timeout: must be within"),
    ("allow_private_media=maybe", "allow_private_media"),
])
def test_bad_values_are_refused_in_one_line(override, match, monkeypatch):
    monkeypatch.delenv("SPAVA_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=match) as info:
        compose_entry_config("serve", ["model=tiny", override])
    assert "\n" not in str(info.value)
