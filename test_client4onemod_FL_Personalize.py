"""The reference code's test script name, kept so its documented command works as written.

Everything is done by ``test_client.py``; this file only forwards to it.
"""
import sys

from test_client import main

if __name__ == "__main__":
    sys.exit(main())
