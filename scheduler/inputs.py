"""Init images named by a local file in a batch: stored under the batch's prefix at submit.

A worker on another machine cannot read the submitter's disk, so a relative `init_image` (which
the validator resolved to a file:// URL with `upload_init`) is stored once per distinct file at
`<batch_id>/inputs/<sha256[:16]><ext>` and the job row gets that object's URL.

Staging a row only names the object (`url_for` hashes the file: the key depends on its bytes);
`upload` stores them all once every row has passed validation, so a bad row anywhere uploads
nothing. When the batch is then not written after all (the upload or the commit failed, or an
identical batch already existed), `discard` removes what `upload` stored: the keys are under this
submit's own batch id, which no other batch can name, so deleting them is always safe.
"""

from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from lcmq.errors import InputError, LcmqError
from lcmq.storage import Storage, check_key, file_sha256

log = logging.getLogger("lcmq.scheduler")

INPUTS_FOLDER = "inputs"


@dataclass(frozen=True)
class StagedInput:
    """A local file some rows name, and the object it becomes."""

    path: Path
    key: str
    content_type: str


class InputUploads:
    def __init__(self, storage: Storage, batch_id: str):
        self.storage = storage
        self.batch_id = batch_id
        self._urls: dict[str, str] = {}  # file:// URL -> stored URL: a file used by 10^4 rows goes up once
        self._staged: list[StagedInput] = []
        self.keys: list[str] = []  # the objects stored so far (what `discard` removes)

    def url_for(self, file_url: str) -> str:
        """The URL the file will have once `upload` stored it; nothing is stored yet."""
        if file_url not in self._urls:
            path = Path(file_url[len("file://") :])
            suffix = path.suffix.lower() if path.suffix[1:].isalnum() else ""
            key = check_key(f"{self.batch_id}/{INPUTS_FOLDER}/{self._content_sha256(path)[:16]}{suffix}")
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self._staged.append(StagedInput(path, key, content_type))
            self._urls[file_url] = self.storage.url(key)
        return self._urls[file_url]

    @staticmethod
    def _content_sha256(path: Path) -> str:
        """The file checked at validation may be unreadable (permissions) or gone by now: the
        user's to fix, said as an input error naming it, not a traceback."""
        try:
            return file_sha256(path)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise InputError(str(path), None, "init_image", f"cannot read the file: {why}") from None

    def upload(self) -> None:
        """Store every staged file (the rows that name them are all valid by now)."""
        for staged in self._staged:
            self.storage.put_file(staged.key, staged.path, staged.content_type)
            self.keys.append(staged.key)
        self._staged.clear()

    def discard(self) -> None:
        """Best effort: the batch was not written, so its inputs should not stay either."""
        for key in self.keys:
            try:
                self.storage.delete(key)
            except (LcmqError, OSError) as exc:
                log.warning("input not removed", extra={"key": key, "error": str(exc)})
        self.keys.clear()
