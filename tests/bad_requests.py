"""Requests every front door must refuse with a 4xx JSON error, before any engine sees them
(longer than a max-model-len of 600 tokens among them)."""

import json

BAD = [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", {"max_tokens": 5}),                                   # missing prompt
    ("/v1/chat/completions", {"max_tokens": 5}),                              # missing messages
    ("/v1/completions", {"prompt": 123}),                                     # wrong type
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}),               # absurd
    ("/v1/completions", {"prompt": "word " * 700, "max_tokens": 5}),          # longer than max-model-len
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}),
    ("/v1/completions", {"prompt": "hi", "n": 0}),
    ("/v1/completions", {"prompt": "hi", "n": 9}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": [99999999]}),
    ("/v1/completions", {"prompt": "hi", "stream": True, "logprobs": 99}),
    # values the engine or the wire cannot hold: refused before they reach a batch
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "temperature": 1, "seed": 18446744073709551616}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [1000000]}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "seed": 2**63}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "top_k": 2**31}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 4, "stop_token_ids": [2**31]}),
    ("/v1/completions", json.dumps({"prompt": "abc \ud800 def", "max_tokens": 4}).encode()),  # a lone surrogate
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "abc \ud800 def"}],
                                         "max_tokens": 4}).encode()),
    ("/v1/completions", {"prompt": [[False]], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": True}),
    ("/v1/completions", b'{"prompt": "Hi", "temperature": Infinity}'),
]
