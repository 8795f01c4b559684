import json

import pytest
import torch

from megamdm.text import ByteTokenizer, HFTokenizer, format_prompt, masked_prompt, tokenize_prompts


def test_template_carries_micro_conditioning():
    p = format_prompt("a  red\ncircle", width=512, height=256, crop=(3, 7), score=6.25)
    assert p == "a red circle | size 512x256 | crop 3,7 | score 6.2"
    assert format_prompt("x", width=1, height=1, micro_conditioning=False) == "x"


@pytest.mark.filterwarnings("ignore:a prompt longer than text.max_len")
def test_byte_tokenizer_padding_and_truncation():
    tok = ByteTokenizer()
    ids, pad, cut = tokenize_prompts(tok, ["ab", "héllo", "x" * 20], max_len=6)
    assert cut == 1  # "héllo" is 6 bytes: it fits exactly and is not counted
    assert ids[0, :2].tolist() == [97, 98] and pad[0].tolist() == [False, False] + [True] * 4
    assert (ids[0, 2:] == tok.pad_id).all()
    assert tok.decode(ids[1][~pad[1]].tolist()) == "héllo"
    assert not pad[2].any()  # truncated to max_len
    mids, mpad = masked_prompt(tok.mask_id, ids, pad)
    assert (mids == tok.mask_id).all() and not mpad.any()  # drop_len 0: every position
    mids, mpad = masked_prompt(tok.mask_id, ids, pad, 3)
    assert mpad[:, 3:].all() and not mpad[:, :3].any() and (mids[:, :3] == tok.mask_id).all()
    mids, mpad = masked_prompt(tok.mask_id, ids, pad, -1)  # the prompt's own length
    assert torch.equal(mpad, pad) and (mids[~pad] == tok.mask_id).all()
    assert tok.mask_id != tok.pad_id and tok.vocab_size == 258


def test_hf_tokenizer_from_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<mask>": 1, "[UNK]": 2, "a": 3, "red": 4, "circle": 5}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "mask_token": "<mask>"}))
    tok = HFTokenizer(tmp_path)
    assert (tok.pad_id, tok.mask_id, tok.vocab_size) == (0, 1, 6)
    ids, pad, _ = tokenize_prompts(tok, ["a red circle", "a blue circle"], max_len=4)
    assert ids[0, :3].tolist() == [3, 4, 5] and pad[0, 3]
    assert ids[1, 1].item() == 2  # unknown word
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(tmp_path, mask_token="<nope>")


def test_a_cut_prompt_is_said_not_silent():
    from megamdm.text import ByteTokenizer, tokenize_prompts

    with pytest.warns(UserWarning, match="a prompt longer than text.max_len=4 tokens was cut"):
        ids, pad, cut = tokenize_prompts(ByteTokenizer(), ["hello world", "hi"], 4)
    assert cut == 1 and not pad[0].any() and pad[1].tolist() == [False, False, True, True]
