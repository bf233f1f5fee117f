"""The test suite itself runs offline, with a throw-away Hugging Face cache."""


def test_hub_is_offline_for_every_test() -> None:
    import huggingface_hub.constants as hub

    assert hub.HF_HUB_OFFLINE
    assert "phf-tests-hf-home-" in hub.HF_HOME
