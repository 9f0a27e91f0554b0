"""The model repository on disk: immutable version folders and the policy that picks one.

    <root>/<name>/<version>/model.onnx
    <root>/<name>/<version>/metadata.json
    <root>/<name>/policy.json     which version serves, the canary and the shadow
    <root>/routing.json           tenant -> model name, with a default model

A version is published by writing a hidden temporary folder and renaming it into place, so a
reader never sees half a version, and the rename fails rather than overwrite a version that
exists. policy.json and routing.json are replaced atomically too, so a replica polling them
reads either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.model_metadata import ModelMetadata

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
POLICY_FILE = "policy.json"
ROUTING_FILE = "routing.json"
HISTORY_LENGTH = 20
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)


class RepositoryError(Exception):
    """The repository lacks a model or version, or holds a file that cannot be read."""


class VersionNotFound(RepositoryError):
    """The repository has no such model or no such version of it."""


class Canary(BaseModel):
    """A version that scores a fixed share of users, chosen by a hash of the user id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    weight: float = Field(gt=0.0, le=1.0)


class Policy(BaseModel):
    """Which versions of a model serve: the active one, a canary and a shadow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    active: int = Field(ge=1)
    canary: Canary | None = None
    shadow: int | None = Field(None, ge=1)
    history: list[int] = Field(default_factory=list)
    """Earlier active versions, the most recent last: what rollback returns to."""

    def activated(self, version: int) -> Policy:
        """This policy with `version` active; a canary of that version is thereby promoted."""
        if version == self.active:
            return self
        canary = self.canary if self.canary and self.canary.version != version else None
        history = [*self.history, self.active][-HISTORY_LENGTH:]
        return self.model_copy(update={"active": version, "canary": canary, "history": history})

    def rolled_back(self) -> Policy:
        if not self.history:
            raise RepositoryError(f"no earlier active version to roll back to from {self.active}")
        return self.model_copy(update={"active": self.history[-1], "history": self.history[:-1]})


class Routing(BaseModel):
    """Which model scores each tenant; tenants not listed get the default model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default: str
    tenants: dict[str, str] = Field(default_factory=dict)

    def model_for(self, tenant: str | None) -> str:
        if tenant is None:
            return self.default
        return self.tenants.get(tenant, self.default)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only
    os.replace(tmp, path)


class ModelRepository:
    """Reads and publishes model versions under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_dir(self, name: str) -> Path:
        if not MODEL_NAME.fullmatch(name):
            raise RepositoryError(
                f"invalid model name {name!r}: letters, digits, '.', '_' and '-', at most 128, "
                "not starting with '.'"
            )
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        return self.model_dir(name) / str(version)

    def versions(self, name: str) -> list[int]:
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())

    def read_policy(self, name: str) -> Policy | None:
        path = self.model_dir(name) / POLICY_FILE
        if not path.exists():
            return None
        try:
            return Policy.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise RepositoryError(f"{path}: not a valid policy: {exc}") from exc

    def active_version(self, name: str) -> int:
        """The policy's active version, or the newest version when there is no policy."""
        policy = self.read_policy(name)
        if policy is not None:
            return policy.active
        versions = self.versions(name)
        if not versions:
            raise VersionNotFound(f"no versions of model {name!r} under {self.root}")
        return versions[-1]

    def read_metadata(self, name: str, version: int) -> ModelMetadata:
        path = self.version_dir(name, version) / METADATA_FILE
        if not path.exists():
            raise VersionNotFound(f"model {name!r} has no version {version} ({path} is missing)")
        try:
            return ModelMetadata.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise RepositoryError(f"{path}: invalid metadata: {exc}") from exc

    def write_metadata(self, metadata: ModelMetadata) -> None:
        """Replace a published version's metadata (atomically), e.g. to add a drift reference.
        Refused if it would describe another file than the version's model.onnx."""
        current = self.read_metadata(metadata.name, metadata.version)
        if metadata.sha256 != current.sha256:
            raise RepositoryError(
                f"{metadata.name} v{metadata.version}: the new metadata names another model file"
            )
        path = self.version_dir(metadata.name, metadata.version) / METADATA_FILE
        _write_atomically(path, metadata.model_dump_json(indent=2) + "\n")

    def model_path(self, name: str, version: int) -> Path:
        return self.version_dir(name, version) / MODEL_FILE

    def policy(self, name: str) -> Policy:
        """The stored policy, or one that serves the newest version when there is none."""
        return self.read_policy(name) or Policy(active=self.active_version(name))

    def write_policy(self, name: str, policy: Policy) -> None:
        available = self.versions(name)
        named = [policy.active, policy.shadow, policy.canary.version if policy.canary else None]
        for version in named:
            if version is not None and version not in available:
                raise VersionNotFound(f"model {name!r} has no version {version}")
        _write_atomically(self.model_dir(name) / POLICY_FILE, policy.model_dump_json(indent=2))

    def set_active(self, name: str, version: int) -> None:
        current = self.read_policy(name)
        self.write_policy(name, current.activated(version) if current else Policy(active=version))

    def read_routing(self, default_model: str) -> Routing:
        """routing.json, or a routing that sends every tenant to `default_model`."""
        path = self.root / ROUTING_FILE
        if not path.exists():
            return Routing(default=default_model)
        try:
            return Routing.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise RepositoryError(f"{path}: not a valid routing: {exc}") from exc

    def write_routing(self, routing: Routing) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.root / ROUTING_FILE, routing.model_dump_json(indent=2))

    def watched_files(self, names: list[str]) -> list[Path]:
        """The small files whose change means replicas must re-sync."""
        return [self.root / ROUTING_FILE, *(self.model_dir(n) / POLICY_FILE for n in names)]

    def publish(
        self, name: str, model_file: Path, metadata: ModelMetadata, *, activate: bool = True
    ) -> ModelMetadata:
        """Store a new version (the next integer) and return its metadata as written."""
        folder = self.model_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
        staging.chmod(0o755)  # mkdtemp creates folders readable by the owner only
        try:
            shutil.copyfile(model_file, staging / MODEL_FILE)
            checksum = file_sha256(staging / MODEL_FILE)
            while True:
                version = max(self.versions(name), default=0) + 1
                written = metadata.model_copy(
                    update={"name": name, "version": version, "sha256": checksum}
                )
                (staging / METADATA_FILE).write_text(written.model_dump_json(indent=2) + "\n")
                try:
                    staging.rename(folder / str(version))
                    break
                except OSError:
                    # Another publisher took this number first: take the next one.
                    if not (folder / str(version)).exists():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if activate:
            self.set_active(name, version)
        return written
