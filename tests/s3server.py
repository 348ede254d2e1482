"""A real S3 API on 127.0.0.1 for the suite: moto's server (``moto[server]`` from PyPI) in this
process, reached over HTTP by the tests, by winnow and by every Ray worker through the standard
``AWS_*`` variables alone. No mock of fsspec, s3fs or boto: requests go over a socket to a server
that implements S3's REST API (multipart uploads included).

The credentials are made-up values that a test greps for in every file and log winnow writes."""
from __future__ import annotations

import logging
import os
import uuid

SECRET_KEY = "wt-secret-9f3ac41d7be2"      # planted: never to appear in an output file or a log
ACCESS_KEY = "wt-access-5d82e0c3"


class S3Server:
    def __init__(self):
        self.server = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        if self.server is not None:        # one server per process, however often this is imported
            return self
        logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        """Stop answering (the buckets' contents stay in this process: ``start`` serves them again)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def export(self, env=os.environ) -> None:
        """What any client needs to reach the server: the standard variables, nothing winnow-specific."""
        env.update({"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"})

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"wt-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(out)
            token = page["NextContinuationToken"]

    def uploads(self, bucket: str) -> list[str]:
        return [u["Key"] for u in self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    def drop_bucket(self, bucket: str) -> None:
        c = self.client()
        for up in c.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            c.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
        keys = self.keys(bucket)
        for i in range(0, len(keys), 1000):
            c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
        c.delete_bucket(Bucket=bucket)


SERVER = S3Server()
