"""The offline LLM API in vLLM's shapes: dict prompts, chat, finished, cumulative_logprob."""

import pytest

from engine.sampling_params import SamplingParams

from helpers import assert_no_leak


def test_prompt_forms_chat_and_output_fields(tiny_llama):
    from engine.llm import LLM
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256)
    ids = llm.tokenizer.encode("Hello there")
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0, ignore_eos=True)
    outs = llm.generate([{"prompt": "Hello there"}, {"prompt_token_ids": ids}, "Hello there"], params, use_tqdm=False)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids and all(o.finished for o in outs)
    first = outs[0].outputs[0]
    assert first.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in first.logprobs))
    assert llm.generate("Hi", SamplingParams(max_tokens=2))[0].outputs[0].cumulative_logprob is None
    chat = [{"role": "user", "content": "Hello"}]
    direct = llm.generate([llm.tokenizer.apply_chat_template(chat)], params)[0]
    assert llm.chat(chat, params)[0].token_ids == direct.token_ids
    assert [o.token_ids for o in llm.chat([chat, chat], params)] == [direct.token_ids] * 2
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"text": "x"})
    assert_no_leak(llm.engine)
