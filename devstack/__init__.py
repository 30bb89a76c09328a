"""Development infrastructure (loopback S3, make stack, make demo helpers); not part of the installed package."""
