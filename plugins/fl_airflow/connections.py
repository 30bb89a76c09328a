"""S3 credentials from Airflow connections, as every amazon-provider operator takes them.

A federation file names the connections: `storage.aws_conn_id` for the coordinator's own
bucket and, per client, `clients[].aws_conn_id` (a silo's bucket often lives in another
organisation's account). The amazon provider's `AwsBaseHook` reads the connection (access
keys, a role to assume, a region, an `endpoint_url` in its extra), so anything it supports
works here. Without a connection id, the worker's own AWS chain applies (environment,
instance role), as it does for silos, which run without Airflow.
"""

from __future__ import annotations

from fl_tasks.protocol.storage import S3Access


def s3_access(aws_conn_id: str | None) -> S3Access:
    """The S3 endpoint and frozen credentials of an Airflow AWS connection."""
    if aws_conn_id is None:
        return S3Access()
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        # Looked up first: the hook would fall back to the worker's own credentials for a
        # connection id that does not exist, and a typo must not reach another account.
        BaseHook.get_connection(aws_conn_id)
    except AirflowNotFoundException:
        raise ValueError(f"Airflow connection '{aws_conn_id}' (named in the federation file as an aws_conn_id) does "
                         "not exist; create it (type aws: login = access key id, password = secret, extra "
                         "{\"endpoint_url\": ..., \"region_name\": ...})") from None
    hook = AwsBaseHook(aws_conn_id=aws_conn_id, client_type="s3")
    config = hook.conn_config
    credentials = hook.get_credentials()
    return S3Access(endpoint_url=config.endpoint_url, region=config.region_name,
                    access_key_id=credentials.access_key, secret_access_key=credentials.secret_key,
                    session_token=credentials.token)
