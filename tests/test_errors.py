import pytest

from vmnet_broker import errors
from vmnet_broker.errors import Code


@pytest.mark.parametrize(
    "code,text",
    [
        (0, "Broker session started"),
        (1, "Failed to send XPC message to broker"),
        (2, "Broker returned invalid reply"),
        (3, "You are not allowed to create a network"),
        (4, "Invalid broker request"),
        (5, "Network name not found"),
        (6, "Failed to create network"),
        (7, "Internal or unknown error"),
        (99, "(unknown status)"),
    ],
)
def test_strerror_matches_upstream(code, text):
    assert errors.strerror(code) == text


def test_error_for_code_gives_the_subclass_with_code_and_message():
    err = errors.error_for(5, "no network named 'x'")
    assert isinstance(err, errors.NotFound) and isinstance(err, errors.BrokerError)
    assert err.code == Code.NOT_FOUND
    assert str(err) == "Network name not found: no network named 'x'"


def test_unknown_code_still_gives_a_broker_error():
    err = errors.error_for(42)
    assert type(err) is errors.BrokerError and err.code == 42
