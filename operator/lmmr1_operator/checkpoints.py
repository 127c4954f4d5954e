"""Is a checkpoint committed? The operator's only S3 call: HEAD `<checkpoint>/manifest.json`
(the trainer writes the manifest last, so its presence means every file is there)."""

from __future__ import annotations

import base64
import logging
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("lmmr1.checkpoints")
MANIFEST = "manifest.json"


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def manifest_exists(
    uri: str, endpoint: str | None, region: str | None, secret: dict[str, Any] | None
) -> bool:
    """True if `uri`'s manifest exists. Credentials: the run's Secret, else the operator's own
    identity (IRSA / workload identity). Raises on S3 errors other than "not found". Called
    off the reconcile path (`verification`)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    key_id = secret_key = None
    if secret is not None:
        data = secret.get("data", {})
        key_id = base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode()
        secret_key = base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode()
    # A session of its own: boto3's shared default session is not thread-safe to create
    # clients from, and it keeps the first credentials it resolved for the process.
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region or "us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret_key,
        # Bounded (at most about 30 s): a check runs off the reconcile path, but its answer
        # (or its error, shown on the run) should not be long in coming.
        config=Config(
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"},
            connect_timeout=5,
            read_timeout=10,
        ),
    )
    bucket, prefix = split_s3(uri)
    try:
        s3.head_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{MANIFEST}")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True
