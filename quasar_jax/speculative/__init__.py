"""Speculative decoding: what proposes tokens, and the on-device loop that verifies and accepts them.

Drafting (never imports the loop): ``ngram`` (prompt lookup), ``tree`` (token tries),
``drafters`` (the ``Drafter`` protocol and the built-in drafters), ``heads`` and ``s4c`` (S4C's
trained draft heads and their tree drafter).

The loop: ``accept`` (acceptance rules, chain and trie), ``logits`` (the logits stage: penalties,
logit bias, min_tokens, logprobs), ``sampling`` (per-row ``SamplingParams`` and samplers),
``verify`` (one draft + verify forward + acceptance), ``features`` (the hidden state carried for
drafters that read it), ``buckets`` (the static shapes programs compile for), ``engine``
(``GenerationConfig``, ``LoopState``, the ``lax.while_loop`` program, ``Engine``) and ``results``.
"""
