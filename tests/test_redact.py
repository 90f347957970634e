"""Secrets never reach a written file: environment values, credential files, URL credentials."""
import json

from kellen.train.redact import MASK, environment, find_secrets, redact, redact_obj


def test_environment_secrets_and_url_credentials_are_masked(tmp_path):
    creds = tmp_path / "key.json"
    creds.write_text(json.dumps({"type": "service_account", "private_key": "-----BEGIN-----\nABCDEFGHIJKLMNOPQRSTUV\n",
                                 "client_email": "bot@secret-project.iam.gserviceaccount.com"}))
    env = {"WANDB_API_KEY": "0123456789abcdef0123", "MY_TOKEN": "tok_value_1234", "USE_AUTH": "true",
           "GOOGLE_APPLICATION_CREDENTIALS": str(creds), "XLA_FLAGS": "--xla_foo=1", "HOME": "/root"}
    text = ("key 0123456789abcdef0123 and tok_value_1234; creds at " + str(creds) +
            " https://user:pa55word@host.example/x?token=abc&y=1 gs://bucket/run "
            '{"private_key": "-----BEGIN-----\\nXYZ"} bot@secret-project.iam.gserviceaccount.com ema: true')
    out = redact(text, env)
    for secret in ("0123456789abcdef0123", "tok_value_1234", str(creds), "pa55word", "token=abc",
                   "XYZ", "secret-project"):
        assert secret not in out, secret
    # What is not secret stays readable: hosts, buckets, ordinary values of secret-named variables.
    assert "host.example/x" in out and "gs://bucket/run" in out and "ema: true" in out and "&y=1" in out
    assert out.count(MASK) >= 7

    captured = environment(env)
    assert captured["WANDB_API_KEY"] == MASK and captured["GOOGLE_APPLICATION_CREDENTIALS"] == MASK
    assert captured["XLA_FLAGS"] == "--xla_foo=1" and "HOME" not in captured and "MY_TOKEN" not in captured

    nested = redact_obj({"a": ["https://u:p4ssw0rd@h/"], "b": 3, "c": {"d": "tok_value_1234"}}, env)
    assert nested == {"a": [f"https://{MASK}@h/"], "b": 3, "c": {"d": MASK}}


def test_find_secrets_reads_binary_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01hidden-value\xff")
    (tmp_path / "clean.txt").write_text("nothing here")
    assert find_secrets(str(tmp_path), ["hidden-value"]) == str(tmp_path / "sub" / "blob.bin")
    assert find_secrets(str(tmp_path), ["absent-value"]) is None
