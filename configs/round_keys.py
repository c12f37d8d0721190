"""Keys of the round configuration that the server framework sends with every message and the
site framework reads (a method's own keys are constants of its module, ``methods/<m>.py``)."""

SERVER_ROUND = "server-round"  # the round the message belongs to
SHARE_INCLUDE = "share-include"  # comma-separated parameter groups that travel
SHARE_EXCLUDE = "share-exclude"  # groups left out of them
VALIDATE_GLOBAL = "validate-global"  # the site validates the received global model
