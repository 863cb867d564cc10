# One exception for every refusal, with a stable code (see docs/error-codes.md).
# Two families, as in python-tuf: RELEASE errors mean the release itself is bad or hostile
# (refuse it; do not install it), TRANSPORT errors mean the network or server failed (nothing
# is wrong with the release; try again later). DEVICE errors are local (config, flash).
RELEASE = "release"
TRANSPORT = "transport"
DEVICE = "device"


class OtaError(Exception):
    def __init__(self, code, detail="", kind=RELEASE):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
        self.kind = kind
