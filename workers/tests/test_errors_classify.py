from tunery_worker.client import ProtocolError
from tunery_worker.errors import InvalidConfig, classify


def test_a_refused_upload_is_final_and_named():
    failure = classify(ProtocolError(413, "payload_too_large", "Upload exceeds 4096 bytes."))
    assert failure.code == "payload_too_large" and failure.retryable is False
    assert "4096" in failure.message


def test_unexpected_errors_are_retryable_training_errors():
    failure = classify(ValueError("boom"))
    assert (failure.code, failure.retryable) == ("training_error", True)
    assert classify(InvalidConfig("bad", param="x")).retryable is False
