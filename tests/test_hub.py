"""Hub behaviour with the Hugging Face Hub mocked at the HTTP boundary (no network is ever used).

``huggingface_hub`` sends every request through one ``httpx`` client made by a replaceable factory; the tests
install a client whose transport is :class:`FakeHub`, which serves tiny checkpoints from local folders and answers
errors the way the Hub does (``X-Error-Code`` headers). Everything above the transport (snapshot_download, the
cache layout, offline mode, error classes) is the real library code.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import unquote

import httpx2
import huggingface_hub
import pytest
from conftest import TINY
from huggingface_hub.utils._http import hf_request_event_hook

import vila
from vila.checkpoint import IGNORE_PATTERNS
from vila.cli import main as cli_main
from vila.errors import CheckpointError

REPO = "Efficient-Large-Model/VILA1.5-3b"


class FakeHub:
    """Model repos served from local folders, per revision; every request is logged."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, tuple[str, Path]]] = {}
        self.errors: dict[str, tuple[int, str]] = {}
        self.network = True
        self.log: list[tuple[str, str]] = []

    def add(self, repo: str, folder: Path, revision: str = "main") -> str:
        sha = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
        self.repos.setdefault(repo, {})[revision] = (sha, folder)
        self.repos[repo][sha] = (sha, folder)
        return sha

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.log.append((request.method, path))
        if not self.network:
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, kind, rev, name = "/".join(parts[2:4]), parts[4], "/".join(parts[5:]), ""
        elif len(parts) >= 4 and parts[2] == "resolve":
            repo, kind, rev, name = "/".join(parts[:2]), "resolve", parts[3], "/".join(parts[4:])
        else:
            return httpx2.Response(404, request=request)
        if repo in self.errors:
            status, code = self.errors[repo]
            return httpx2.Response(status, headers={"X-Error-Code": code}, request=request)
        if repo not in self.repos:  # the Hub answers 401 for unknown and private repos alike
            return httpx2.Response(401, headers={"X-Error-Code": "RepoNotFound"}, request=request)
        if rev not in self.repos[repo]:
            return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"}, request=request)
        sha, folder = self.repos[repo][rev]
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if kind == "revision":
            siblings = [{"rfilename": p.relative_to(folder).as_posix()} for p in files]
            return httpx2.Response(200, json={"id": repo, "sha": sha, "siblings": siblings}, request=request)
        if kind == "tree":
            tree = [
                {"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
                | {"path": p.relative_to(folder).as_posix()}
                for p in files
            ]
            return httpx2.Response(200, json=tree, request=request)
        target = folder / name
        if kind != "resolve" or not target.is_file():
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"}, request=request)
        data = target.read_bytes()
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            "Content-Length": str(len(data)),
        }
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data, request=request)

    def fetched(self) -> set[str]:
        """Files downloaded (GET on resolve URLs), as repo paths."""
        return {p.split("/resolve/")[1].split("/", 1)[1] for m, p in self.log if m == "GET" and "/resolve/" in p}


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(
            transport=httpx2.MockTransport(fake),
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
        )
    )
    yield fake
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)


@pytest.fixture
def repo_folder(tmp_path) -> Path:
    """vila15-tiny plus the training leftovers and code a real repo carries (never to be downloaded)."""
    folder = tmp_path / "served"
    shutil.copytree(TINY / "vila15-tiny", folder)
    (folder / "trainer_state.json").write_text("{}")
    (folder / "llava_arch.py").write_text("raise SystemExit('remote code must never be fetched')\n")
    (folder / "llm" / "training_args.bin").write_bytes(b"\x80\x04pickled")
    return folder


def go_offline(monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_download_into_cache_dir_and_load(hub, repo_folder, tmp_path):
    sha = hub.add(REPO, repo_folder)
    model = vila.load(REPO, cache_dir=tmp_path / "cache", device="cpu")
    assert model.config.root == tmp_path / "cache" / "models--Efficient-Large-Model--VILA1.5-3b" / "snapshots" / sha
    assert model.conv_mode == "vicuna_v1"  # detected from the hub id, as the reference does
    assert not (tmp_path / "default-cache").exists()
    assert {"config.json", "llm/model.safetensors", "vision_tower/model.safetensors"} <= hub.fetched()
    assert not {"trainer_state.json", "llava_arch.py", "llm/training_args.bin"} & hub.fetched()
    assert "*.py" in IGNORE_PATTERNS and model.generate("Hi", max_new_tokens=2).token_ids


def test_revision_selects_that_commit(hub, repo_folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(repo_folder, old)
    hub.add(REPO, repo_folder)
    sha = hub.add(REPO, old, revision="v1.0")
    model = vila.load(REPO, revision="v1.0", cache_dir=tmp_path / "cache", device="cpu")
    assert model.config.root.name == sha
    assert ("GET", f"/api/models/{REPO}/revision/v1.0") in hub.log


def test_offline_mode_uses_the_cache_without_any_request(hub, repo_folder, tmp_path, monkeypatch):
    hub.add(REPO, repo_folder)
    cache = tmp_path / "cache"
    first = vila.load(REPO, cache_dir=cache, device="cpu")
    go_offline(monkeypatch)
    hub.log.clear()
    again = vila.load(REPO, cache_dir=cache, device="cpu")
    assert hub.log == [] and again.config.root == first.config.root


def test_offline_mode_without_cache_is_one_clear_line(hub, tmp_path, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(CheckpointError, match="not in the local cache and offline mode is on") as e:
        vila.load(REPO, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value) and hub.log == []


def test_no_network_falls_back_to_the_cache(hub, repo_folder, tmp_path):
    hub.add(REPO, repo_folder)
    cache = tmp_path / "cache"
    vila.load(REPO, cache_dir=cache, device="cpu")
    hub.network = False
    assert vila.load(REPO, cache_dir=cache, device="cpu").conv_mode == "vicuna_v1"


def test_no_network_and_no_cache(hub, tmp_path):
    hub.network = False
    with pytest.raises(CheckpointError, match="the Hub cannot be reached") as e:
        vila.load(REPO, cache_dir=tmp_path / "cache")
    assert "\n" not in str(e.value)


def test_repo_not_found(hub, tmp_path):
    with pytest.raises(CheckpointError, match="'Efficient-Large-Model/NoSuchModel' not found on the Hugging Face Hub"):
        vila.load("Efficient-Large-Model/NoSuchModel", cache_dir=tmp_path / "cache")


def test_gated_repo(hub, tmp_path):
    hub.errors["nvidia/VILA-HD-8B-PS3-4K-SigLIP2"] = (403, "GatedRepo")
    with pytest.raises(CheckpointError, match="is gated: accept its licence") as e:
        vila.load("nvidia/VILA-HD-8B-PS3-4K-SigLIP2", cache_dir=tmp_path / "cache")
    assert "HF_TOKEN" in str(e.value) and "\n" not in str(e.value)


def test_revision_not_found(hub, repo_folder, tmp_path):
    hub.add(REPO, repo_folder)
    with pytest.raises(CheckpointError, match="revision 'v9' does not exist"):
        vila.load(REPO, revision="v9", cache_dir=tmp_path / "cache")


def test_cli_cache_dir_revision_and_errors(hub, repo_folder, tmp_path, capsys):
    sha = hub.add(REPO, repo_folder, revision="v1.0")
    cache = tmp_path / "cli-cache"
    argv = ["-m", REPO, "--revision", "v1.0", "--cache-dir", str(cache), "--text", "Hi", "--max-new-tokens", "2"]
    assert cli_main(argv) == 0
    assert (cache / "models--Efficient-Large-Model--VILA1.5-3b" / "snapshots" / sha / "config.json").is_file()
    capsys.readouterr()
    assert cli_main(["-m", "Efficient-Large-Model/NoSuchModel", "--cache-dir", str(cache), "--text", "Hi"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("vila-infer: error: model 'Efficient-Large-Model/NoSuchModel' not found") and "\n" not in err
