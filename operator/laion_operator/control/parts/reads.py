"""What a part reads besides its object: its Secrets, the progress its job persists, and the
manifest of the output it writes into."""

from __future__ import annotations

import asyncio
import logging

from ...contract import MANIFEST, PROGRESS, Phase, Progress, fingerprint
from ...credentials import ARCHIVE_HEADERS
from ...spec import PartSpec
from ...storage import Store
from .. import kube
from ..resource import condition
from .base import PartObject

log = logging.getLogger(__name__)


class WaitingForCredentials(Exception):
    """The part's Secret is not there (yet) or not readable: the part waits, as a Pod waits for its Secret."""


class Reading(PartObject):
    async def credentials(self, spec: PartSpec, quiet: bool = False) -> dict[str, str] | None:
        """The part's Secrets (read_secret). A Secret that is missing or forbidden may appear later
        (an external-secrets controller): the part waits for it, saying so, and never fails for it;
        any other API error is transient and retried. `quiet`: None instead (the job has them already)."""
        try:
            return await self.read_secret(spec)
        except kube.KubeError as err:
            self.op.metrics.kube_api_errors.inc()
            if quiet:
                return None
            if err.status not in (403, 404):
                raise
            message = (
                str(err)
                if str(err).startswith("spec.")
                else f"spec.output.credentialsSecret {spec.output.credentials_secret!r}: {err}"
            )
            conditions = self.status.get("conditions") or []
            was: dict = next((c for c in conditions if c.get("type") == "CredentialsAvailable"), {})
            await self.write(
                message=f"waiting for credentials: {message}",
                conditions=[condition("CredentialsAvailable", False, "CredentialsUnavailable", message, conditions)],
            )
            if was.get("status") != "False":
                self.event("CredentialsUnavailable", message, warning=True)
            raise WaitingForCredentials(message) from None

    async def read_secret(self, spec: PartSpec) -> dict[str, str] | None:
        """The storage credentials, and the hub token of a part with spec.latents.hubTokenSecret: both
        go to the job as credentials do (see credentials.py), never into its spec or entrypoint."""
        # The model stages' token (latents' first, where both name one)
        section = "latents" if spec.latents and spec.latents.hub_token_secret else "embeddings"
        token = getattr(getattr(spec, section), "hub_token_secret", None)
        headers = spec.archives.headers_secret if spec.archives else None
        if not spec.output.credentials_secret and not token and not headers:
            return None
        secret: dict[str, str] = {}
        if spec.output.credentials_secret:
            secret.update(await asyncio.to_thread(kube.read_secret, self.namespace, spec.output.credentials_secret))
        if token:
            try:
                values = await asyncio.to_thread(kube.read_secret, self.namespace, token)
            except kube.KubeError as err:
                raise kube.KubeError(f"spec.{section}.hubTokenSecret {token!r}: {err}", err.status) from err
            if values.get("HF_TOKEN"):
                secret["HF_TOKEN"] = values["HF_TOKEN"]
        if headers:  # an archive source's HTTP headers (a gated repository's token), as the hub token
            try:
                values = await asyncio.to_thread(kube.read_secret, self.namespace, headers)
            except kube.KubeError as err:
                raise kube.KubeError(f"spec.source.archives.headersSecret {headers!r}: {err}", err.status) from err
            if values.get(ARCHIVE_HEADERS):
                secret[ARCHIVE_HEADERS] = values[ARCHIVE_HEADERS]
        return secret

    async def read_progress(
        self, spec: PartSpec, secret: dict[str, str] | None, strict: bool = False, job: str = ""
    ) -> Progress | None:
        """The job's persisted progress; None when there is none yet, when it is another run's than
        `job`'s (a re-run not started yet: its phase would be the last run's), or when it cannot be
        read (a damaged file or an unreachable store, which the job's next write repairs) unless
        `strict`, which raises."""

        def read() -> Progress | None:
            store = Store(spec.output, secret=secret or {})
            try:
                data = store.read_json(PROGRESS)
                progress = Progress.from_json(data) if data else None
            except Exception as err:  # noqa: BLE001 - any reason means the same: keep the status as it is
                message = f"cannot read {store.url(PROGRESS)}: {type(err).__name__}: {err}"
                if strict:
                    raise OSError(message) from None
                log.warning("part %s/%s: %s", self.namespace, self.name, message)
                return None
            if progress and job and progress.job and progress.job != job:
                if strict:
                    raise OSError(f"{store.url(PROGRESS)} is job {progress.job}'s, not yet job {job}'s")
                return None
            return progress

        return await asyncio.to_thread(read)

    async def holds_other_filter(self, spec: PartSpec, secret: dict[str, str] | None) -> bool:
        """Whether the output holds shards filtered with another source, columns or filter than `spec`'s
        (False while it cannot be read: an unreachable output is the job's to report)."""

        def manifest():
            return Store(spec.output, secret=secret or {}).read_json(MANIFEST)

        try:
            done = await asyncio.to_thread(manifest)
        except Exception as err:  # noqa: BLE001 - an unreachable output is the job's to report
            log.info("part %s/%s: output not readable yet: %s", self.namespace, self.name, err)
            return False
        return bool(done) and done.get("fingerprint") != fingerprint(spec)

    async def observe_final(self) -> None:
        """A settled part's metrics, read back once after an operator restart from what the job persisted."""
        if self.key in self.op.metrics.parts():
            return
        try:
            spec = PartSpec.from_dict(self.body["spec"])
            progress = await self.read_progress(spec, await self.read_secret(spec))
        except Exception:  # noqa: BLE001 - metrics of a finished part are best effort
            progress = None
        self.op.metrics.observe_part(
            self.namespace,
            self.name,
            self.status.get("phase") or Phase.PENDING,
            progress,
            self.status.get("retries", 0),
        )
