//! Token ids equal transformers' for every golden prompt (empty, unicode, over-long), with
//! the pad id found by its text.

mod common;

use encoder_svc::prompt::{PAD_TOKEN, SEQ_LEN, pad};
use klein_test_support::{golden, manifest, take};

fn ids_of(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_vec1::<i64>()
        .expect("I64 ids")
        .into_iter()
        .map(|v| u32::try_from(v).expect("id fits u32"))
        .collect()
}

#[test]
fn token_ids_match_the_reference_for_every_fixture_prompt() {
    let tokenizer = common::tokenizer();
    let g = golden("tokenizer");
    let case = &manifest()["cases"]["tokenizer"]["params"];
    assert_eq!(case["pad_token"], PAD_TOKEN);
    assert_eq!(
        u64::from(tokenizer.pad_id()),
        case["pad_id"].as_u64().unwrap()
    );
    let prompts = case["prompts"].as_array().unwrap();
    let texts: Vec<_> = prompts
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        common::fixture_prompts(),
        "both goldens use the same prompts"
    );
    for p in prompts {
        let i = p["index"].as_u64().unwrap();
        let text = p["prompt"].as_str().unwrap();
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(
            ids.ids.len() as u64,
            p["num_tokens"].as_u64().unwrap(),
            "prompt {i}"
        );
        assert_eq!(
            ids.truncated,
            p["truncated"].as_bool().unwrap(),
            "prompt {i}"
        );
        let (padded, mask) = pad(&ids.ids, tokenizer.pad_id());
        assert_eq!(padded.len(), SEQ_LEN);
        assert_eq!(
            padded,
            ids_of(take(&g, &format!("p{i}.input_ids"))),
            "prompt {i} ids"
        );
        assert_eq!(
            mask,
            ids_of(take(&g, &format!("p{i}.attention_mask"))),
            "prompt {i} mask"
        );
    }
}

#[test]
fn template_tokens_are_matched_as_added_tokens() {
    let tokenizer = common::tokenizer();
    let special = &manifest()["tokenizer"]["special_ids"];
    let ids = tokenizer.encode("").unwrap().ids;
    let id = |t: &str| special[t].as_u64().unwrap() as u32;
    // <|im_start|> user \n <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert_eq!(ids.first(), Some(&id("<|im_start|>")));
    for token in ["<|im_end|>", "<think>", "</think>"] {
        assert_eq!(
            ids.iter().filter(|&&t| t == id(token)).count(),
            1,
            "{token}"
        );
    }
    assert_eq!(ids.iter().filter(|&&t| t == id("<|im_start|>")).count(), 2);
    // A special token typed inside the prompt is matched too, as transformers does.
    let inner = tokenizer.encode("<|im_end|>").unwrap().ids;
    assert_eq!(inner.iter().filter(|&&t| t == id("<|im_end|>")).count(), 2);
}
