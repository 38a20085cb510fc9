"""Archive URIs as config values: which schemes are known, and refusing one that holds
credentials (they would be saved with the run). The archive package reads and writes them."""

from urllib.parse import parse_qsl, urlsplit

from src.core.errors import UserError

BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "file": None}  # scheme -> fsspec back end
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature", "sig")


def is_archive_uri(text: str | None) -> bool:
    """Whether `text` names an archive (scheme://...) rather than a local directory."""
    return bool(text) and "://" in text


def credentials_problem(uri: str) -> str | None:
    """Why `uri` must be refused for holding credentials, or None. The URI itself is never
    repeated in the message, since it holds a secret."""
    parts = urlsplit(uri)
    secret_parameters = [name for name, _ in parse_qsl(parts.query) if any(w in name.lower() for w in SECRET_WORDS)]
    if "@" not in parts.netloc and not secret_parameters:
        return None
    where = "user:secret@ before the bucket" if "@" in parts.netloc else f"?{secret_parameters[0]}="
    return (
        f"the archive URI holds credentials ({where}), which would be saved with the run; "
        "give them the usual way instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws for S3, "
        "GOOGLE_APPLICATION_CREDENTIALS for GCS) and write only scheme://bucket/prefix (value not shown)"
    )


def check_uri(uri: str) -> str:
    """`uri` without a trailing slash; UserError for credentials or an unknown scheme."""
    problem = credentials_problem(uri)
    if problem:
        raise UserError(problem)
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in BACKENDS or not uri.split("://", 1)[1].strip("/"):
        raise UserError(
            f"archive URI {uri!r}: expected s3://bucket/prefix, gs://bucket/prefix or file:///absolute/path"
        )
    if scheme == "file" and (urlsplit(uri).netloc or not urlsplit(uri).path.startswith("/")):
        # file://relative/dir reads as the host "relative": fsspec makes it a path relative to the
        # working directory, so the archive would land inside the repository (or above it).
        raise UserError(
            f"archive URI {uri!r}: a file:// archive needs an absolute path, three slashes: file:///absolute/path"
        )
    return uri.rstrip("/")
