import logging

import actors.weight_receiver  # noqa: F401  (installs the filter)


def test_only_the_rotary_reload_warning_is_dropped():
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    seen = []

    class Capture(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Capture()
    logger.addHandler(handler)
    try:
        logger.warning("%s: Failed to load weights", "RotaryEmbedding")
        logger.warning("%s: Failed to load weights", "QKVParallelLinear")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["QKVParallelLinear: Failed to load weights", "something else"]
