//! The rules a request's LoRA list ([`pb::LoraAdapter`]) follows, checked alike by the gateway
//! (against the adapters the denoiser's Info lists) and the denoiser (against its own).

use crate::pb;

/// Most adapters one request applies.
pub const MAX_LORAS: usize = 8;
/// Largest strength magnitude a request gives an adapter.
pub const MAX_SCALE: f32 = 8.0;
/// Longest adapter name.
pub const MAX_NAME: usize = 64;

/// Whether `name` is an adapter name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A command-line adapter, `NAME` or `NAME:SCALE` (checked later, with the request).
pub fn parse_arg(s: &str) -> Result<pb::LoraAdapter, String> {
    let (name, scale) = match s.split_once(':') {
        Some((name, scale)) => {
            let scale = scale
                .parse::<f32>()
                .map_err(|_| format!("{s:?}: the scale after `:` must be a number"))?;
            (name, Some(scale))
        }
        None => (s, None),
    };
    if name.is_empty() {
        return Err(format!("{s:?}: an empty adapter name"));
    }
    Ok(pb::LoraAdapter {
        name: name.to_owned(),
        scale,
    })
}

/// A refused list: the field (`loras`, `loras[i].name`, `loras[i].scale`) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRefusal {
    pub field: String,
    pub reason: String,
}

/// `loras` as (name, strength) pairs in order (an absent strength is 1), or why not: more
/// than [`MAX_LORAS`], a name that is not one ([`valid_name`]), given twice or not among
/// `served` (model `model`'s adapters), a strength that is not finite or past ±[`MAX_SCALE`].
pub fn check(
    loras: &[pb::LoraAdapter],
    model: &str,
    served: &[String],
) -> Result<Vec<(String, f32)>, LoraRefusal> {
    let refuse = |field: String, reason: String| LoraRefusal { field, reason };
    if loras.len() > MAX_LORAS {
        return Err(refuse(
            "loras".into(),
            format!("{} adapters exceed the limit {MAX_LORAS}", loras.len()),
        ));
    }
    let mut out: Vec<(String, f32)> = Vec::with_capacity(loras.len());
    for (i, l) in loras.iter().enumerate() {
        if !valid_name(&l.name) {
            return Err(refuse(
                format!("loras[{i}].name"),
                format!(
                    "{:?} is not an adapter name (1–{MAX_NAME} letters, digits, `.`, `_` or `-`)",
                    l.name
                ),
            ));
        }
        if out.iter().any(|(n, _)| *n == l.name) {
            return Err(refuse(
                format!("loras[{i}].name"),
                format!("adapter {:?} is given twice", l.name),
            ));
        }
        if !served.contains(&l.name) {
            let served = match served.is_empty() {
                true => "none".to_owned(),
                false => served.join(", "),
            };
            return Err(refuse(
                format!("loras[{i}].name"),
                format!(
                    "model {model:?} has no adapter {:?} (its adapters: {served})",
                    l.name
                ),
            ));
        }
        let scale = l.scale.unwrap_or(1.0);
        if !scale.is_finite() || scale.abs() > MAX_SCALE {
            return Err(refuse(
                format!("loras[{i}].scale"),
                format!("{scale} must be finite and within ±{MAX_SCALE}"),
            ));
        }
        out.push((l.name.clone(), scale));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(name: &str, scale: Option<f32>) -> pb::LoraAdapter {
        pb::LoraAdapter {
            name: name.into(),
            scale,
        }
    }

    #[test]
    fn an_argument_is_a_name_and_an_optional_scale() {
        assert_eq!(parse_arg("style:0.8").unwrap(), lora("style", Some(0.8)));
        assert_eq!(parse_arg("ink").unwrap(), lora("ink", None));
        for bad in ["style:x", ":0.5", "", "a:"] {
            assert!(parse_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_list_is_checked_field_by_field() {
        let served: Vec<String> = ["a", "anime-v2.1", "b", "b_2"].map(String::from).to_vec();
        let check = |l: &[pb::LoraAdapter]| check(l, "m", &served);
        assert_eq!(
            check(&[lora("anime-v2.1", None), lora("b_2", Some(-0.5))]).unwrap(),
            [("anime-v2.1".to_owned(), 1.0), ("b_2".to_owned(), -0.5)]
        );
        let field = |l: &[pb::LoraAdapter]| check(l).unwrap_err().field;
        let unknown = check(&[lora("a", None), lora("ink", None)]).unwrap_err();
        assert_eq!(unknown.field, "loras[1].name");
        assert!(
            unknown
                .reason
                .contains("its adapters: a, anime-v2.1, b, b_2"),
            "{unknown:?}"
        );
        let none = super::check(&[lora("a", None)], "m", &[]).unwrap_err();
        assert!(
            none.reason
                .contains("model \"m\" has no adapter \"a\" (its adapters: none)"),
            "{none:?}"
        );
        assert!(super::check(&[], "m", &[]).unwrap().is_empty());
        assert_eq!(
            field(&[lora("a", None), lora("../x", None)]),
            "loras[1].name"
        );
        assert_eq!(field(&[lora("", None)]), "loras[0].name");
        assert_eq!(field(&[lora(&"n".repeat(65), None)]), "loras[0].name");
        assert_eq!(field(&[lora("a b", None)]), "loras[0].name");
        assert_eq!(
            field(&[lora("a", None), lora("a", Some(2.0))]),
            "loras[1].name"
        );
        assert_eq!(field(&[lora("a", Some(f32::NAN))]), "loras[0].scale");
        assert_eq!(field(&[lora("a", Some(8.5))]), "loras[0].scale");
        let many: Vec<_> = (0..9).map(|i| lora(&format!("a{i}"), None)).collect();
        assert_eq!(field(&many), "loras");
        assert!(check(&[lora("a", Some(-8.0)), lora("b", Some(0.0))]).is_ok());
    }
}
