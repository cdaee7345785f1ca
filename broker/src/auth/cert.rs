//! The principal of a client certificate: attributes of its subject (CN, O, OU) put into a
//! configurable template (`{CN}` by default). The certificate was verified by rustls against
//! `--client-ca`; this only reads its subject, with a small DER walker.

/// OIDs of the subject attributes a template may name.
const ATTRIBUTES: [(&str, &[u8]); 3] = [
    ("CN", &[0x55, 0x04, 0x03]),
    ("O", &[0x55, 0x04, 0x0a]),
    ("OU", &[0x55, 0x04, 0x0b]),
];

/// The default mapping: the subject's common name.
pub const PRINCIPAL_TEMPLATE_DEFAULT: &str = "{CN}";

/// One DER element: its tag and contents, and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |n, b| (n << 8) | *b as usize);
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The subject's attributes as `(oid, value)` from a certificate's DER.
fn subject_attributes(cert_der: &[u8]) -> Option<Vec<(Vec<u8>, String)>> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = element(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, mut tbs, _) = element(certificate)?;
    // version [0] (optional), serial, signature algorithm, issuer, validity, subject.
    let (tag, _, rest) = element(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        let (_, _, rest) = element(tbs)?;
        tbs = rest;
    } else {
        tbs = rest;
    }
    for _ in 0..3 {
        let (_, _, rest) = element(tbs)?;
        tbs = rest;
    }
    let (tag, mut name, _) = element(tbs)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut attributes = Vec::new();
    while !name.is_empty() {
        let (_, mut set, rest) = element(name)?;
        name = rest;
        while !set.is_empty() {
            let (_, pair, rest) = element(set)?;
            set = rest;
            let (_, oid, after) = element(pair)?;
            let (_, value, _) = element(after)?;
            attributes.push((oid.to_vec(), String::from_utf8_lossy(value).into_owned()));
        }
    }
    Some(attributes)
}

/// The principal `template` makes of the certificate's subject, or why it makes none (no
/// such attribute, an unreadable certificate, an empty result).
pub fn principal_from_certificate(cert_der: &[u8], template: &str) -> Result<String, String> {
    let attributes =
        subject_attributes(cert_der).ok_or("the client certificate's subject is unreadable")?;
    let mut principal = template.to_owned();
    for (name, oid) in ATTRIBUTES {
        let placeholder = format!("{{{name}}}");
        if !principal.contains(&placeholder) {
            continue;
        }
        let value = attributes
            .iter()
            .find(|(o, _)| o == oid)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| format!("the client certificate's subject has no {name}"))?;
        principal = principal.replace(&placeholder, value);
    }
    if principal.is_empty() {
        return Err("the client certificate maps to an empty principal".into());
    }
    Ok(principal)
}

/// Checks a template names only known attributes.
pub fn validate_template(template: &str) -> Result<(), String> {
    let mut rest = template.to_owned();
    for (name, _) in ATTRIBUTES {
        rest = rest.replace(&format!("{{{name}}}"), "");
    }
    if rest.contains('{') || rest.contains('}') {
        return Err(format!(
            "client principal template {template:?}: only {{CN}}, {{O}} and {{OU}} may be used"
        ));
    }
    if !template.contains('{') {
        return Err(format!(
            "client principal template {template:?} names no attribute: every certificate would be the same principal"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: Option<&str>, o: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        if let Some(o) = o {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, o);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn templates_map_subjects() {
        let both = certificate(Some("alice"), Some("acme"));
        let cases: &[(&[u8], &str, Result<&str, &str>)] = &[
            (&both, "{CN}", Ok("alice")),
            (&both, "{O}/{CN}", Ok("acme/alice")),
            (&both, "{OU}", Err("has no OU")),
            (&certificate(None, Some("acme")), "{CN}", Err("has no CN")),
            (b"\x30\x03\x02\x01", "{CN}", Err("unreadable")),
            (b"", "{CN}", Err("unreadable")),
        ];
        for (der, template, expected) in cases {
            let got = principal_from_certificate(der, template);
            match expected {
                Ok(p) => assert_eq!(got.as_deref(), Ok(*p), "{template}"),
                Err(why) => assert!(got.unwrap_err().contains(why), "{template}"),
            }
        }
        // A long subject (multi-byte DER lengths) still parses.
        let long = "x".repeat(300);
        assert_eq!(
            principal_from_certificate(&certificate(Some(&long), None), "{CN}"),
            Ok(long)
        );
    }

    #[test]
    fn templates_are_validated() {
        assert!(validate_template("{CN}").is_ok());
        assert!(validate_template("user:{O}.{CN}").is_ok());
        assert!(validate_template("{SN}").is_err());
        assert!(validate_template("fixed").is_err());
    }
}
