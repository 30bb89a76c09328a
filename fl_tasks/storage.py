"""S3 access through boto3. The endpoint is configurable: AWS, MinIO or a local emulator."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class ObjectTooLarge(ValueError):
    """An object is larger than the reader accepts (e.g. a hostile oversized payload)."""


class ObjectStore:
    """A thin owner of one boto3 S3 client; every method names bucket and key explicitly."""

    def __init__(self, endpoint_url: str | None = None, region: str | None = None):
        self.endpoint_url = endpoint_url or os.environ.get("FL_S3_ENDPOINT_URL") or None
        self._client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                          s3={"addressing_style": "path"} if self.endpoint_url else None),
        )

    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> bool:
        """Write the object only if the key is free (S3 conditional write); False when it was taken."""
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def get_bytes(self, bucket: str, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        try:
            response = self._client.get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return None
            raise
        body = response["Body"]
        if max_bytes is not None and response.get("ContentLength", 0) > max_bytes:
            body.close()
            raise ObjectTooLarge(f"s3://{bucket}/{key} is {response['ContentLength']} bytes, over the {max_bytes} limit")
        return body.read()

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self._client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return False
            raise

    def last_modified(self, bucket: str, key: str) -> datetime | None:
        """When the object was last written (the store's clock), or None when it does not exist."""
        try:
            return self._client.head_object(Bucket=bucket, Key=key)["LastModified"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return None
            raise

    def list_keys(self, bucket: str, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def delete(self, bucket: str, key: str) -> None:
        self._client.delete_object(Bucket=bucket, Key=key)

    def ensure_bucket(self, bucket: str) -> None:
        try:
            self._client.head_bucket(Bucket=bucket)
        except ClientError:
            self._client.create_bucket(Bucket=bucket)
