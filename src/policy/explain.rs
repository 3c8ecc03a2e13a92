//! The policy explained to a reader of the privacy statement, in Dutch or English: who is
//! responsible, per purpose what is used, why, for how long and who receives it, and where to
//! complain.

use std::{fmt, str::FromStr};

use super::{LegalBasis, Objection, Policy, Purpose};

/// The language of an explanation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    Nl,
    En,
}

impl Lang {
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Nl => "nl",
            Lang::En => "en",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A language that is not `nl` or `en`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownLang;

impl fmt::Display for UnknownLang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown language: expected nl or en")
    }
}

impl std::error::Error for UnknownLang {}

impl FromStr for Lang {
    type Err = UnknownLang;
    fn from_str(s: &str) -> Result<Self, UnknownLang> {
        match s {
            "nl" => Ok(Lang::Nl),
            "en" => Ok(Lang::En),
            _ => Err(UnknownLang),
        }
    }
}

/// The fixed sentences of an explanation.
struct Texts {
    title: &'static str,
    version: &'static str,
    date_note: &'static str,
    controller: &'static str,
    data: &'static str,
    basis: &'static str,
    retention: &'static str,
    no_retention: &'static str,
    readers: &'static str,
    objection: &'static str,
    opt_out: &'static str,
    consent: &'static str,
    not_obligation: &'static str,
    not_contract: &'static str,
    not_other: &'static str,
    recipients: &'static str,
    rights_heading: &'static str,
    rights: &'static str,
    complaint_heading: &'static str,
    complaint: &'static str,
}

const NL: Texts = Texts {
    title: "Privacyverklaring",
    version: "Versie",
    date_note: "let op deze datum: bij een nieuwe versie verandert hij",
    controller: "Verantwoordelijk voor uw gegevens",
    data: "Gegevens",
    basis: "Grondslag",
    retention: "Bewaartermijn",
    no_retention: "dit doel bewaart zelf niets; het gebruikt alleen gegevens die wij voor een ander doel hierboven bewaren",
    readers: "Na afloop van het doel alleen nog in te zien door",
    objection: "Bezwaar",
    opt_out: "U kunt op ieder moment bezwaar maken.",
    consent: "alleen met uw toestemming; u kunt uw toestemming op ieder moment intrekken.",
    not_obligation: "niet mogelijk, want wij zijn dit wettelijk verplicht.",
    not_contract: "niet mogelijk, want het is nodig voor de overeenkomst met u.",
    not_other: "neem contact met ons op (zie de contactgegevens).",
    recipients: "Wij kunnen deze gegevens verstrekken aan",
    rights_heading: "Uw rechten",
    rights: "U hebt recht op uitleg over welke persoonsgegevens wij hebben en wat wij daarmee doen, op inzage in de precieze gegevens, op het laten corrigeren van fouten, op het laten verwijderen van verouderde gegevens, op het intrekken van toestemming en op bezwaar tegen een bepaald gebruik. Geef altijd duidelijk aan wie u bent, zodat wij geen gegevens van de verkeerde persoon aanpassen of verwijderen.",
    complaint_heading: "Klacht indienen",
    complaint: "Als u vindt dat wij u niet op de juiste manier helpen, dan hebt u het recht om een klacht in te dienen bij de toezichthouder",
};

const EN: Texts = Texts {
    title: "Privacy statement",
    version: "Version",
    date_note: "mind this date: it changes with every new version",
    controller: "Responsible for your data",
    data: "Data",
    basis: "Legal basis",
    retention: "Retention",
    no_retention: "this purpose keeps nothing of its own; it only uses data we keep for another purpose above",
    readers: "After the purpose has ended, readable only by",
    objection: "Objection",
    opt_out: "you can object at any time.",
    consent: "only with your consent; you can withdraw your consent at any time.",
    not_obligation: "not possible, because we are required to do this by law.",
    not_contract: "not possible, because it is needed for the contract with you.",
    not_other: "contact us (see the contact details).",
    recipients: "We may disclose this data to",
    rights_heading: "Your rights",
    rights: "You have the right to an explanation of which personal data we hold and what we do with it, to access the exact data, to have errors corrected, to have outdated data deleted, to withdraw consent and to object to a particular use. Always state clearly who you are, so that we do not change or delete the data of the wrong person.",
    complaint_heading: "Complaints",
    complaint: "If you feel we are not helping you properly, you have the right to lodge a complaint with the supervisory authority",
};

impl LegalBasis {
    /// The basis in words.
    pub fn words(self, lang: Lang) -> &'static str {
        match (self, lang) {
            (LegalBasis::LegalObligation, Lang::Nl) => "wettelijke verplichting",
            (LegalBasis::LegalObligation, Lang::En) => "legal obligation",
            (LegalBasis::Contract, Lang::Nl) => "overeenkomst",
            (LegalBasis::Contract, Lang::En) => "contract",
            (LegalBasis::LegitimateInterest, Lang::Nl) => "gerechtvaardigd belang",
            (LegalBasis::LegitimateInterest, Lang::En) => "legitimate interest",
            (LegalBasis::Consent, Lang::Nl) => "toestemming",
            (LegalBasis::Consent, Lang::En) => "consent",
        }
    }
}

impl Policy {
    /// The policy in words for a reader of the statement: controller, version and date, each
    /// purpose, the reader's rights and the supervisory authority.
    pub fn explain(&self, lang: Lang) -> String {
        let t = match lang {
            Lang::Nl => &NL,
            Lang::En => &EN,
        };
        let c = &self.controller;
        let mut out = String::new();
        out.push_str(&format!("{} — {}\n", t.title, c.name));
        out.push_str(&format!(
            "{} {}, {} ({}).\n\n",
            t.version, self.version, self.date, t.date_note
        ));
        out.push_str(&format!(
            "{}:\n  {}\n  {}\n  E. {}\n  T. {}\n",
            t.controller, c.name, c.address, c.email, c.phone
        ));
        for p in &self.purposes {
            out.push('\n');
            self.explain_purpose(p, lang, t, &mut out);
        }
        out.push_str(&format!("\n{}\n  {}\n", t.rights_heading, t.rights));
        out.push_str(&format!(
            "\n{}\n  {}: {}.\n",
            t.complaint_heading, t.complaint, c.supervisory_authority
        ));
        out
    }

    fn explain_purpose(&self, p: &Purpose, lang: Lang, t: &Texts, out: &mut String) {
        let description = match lang {
            Lang::Nl => &p.description_nl,
            Lang::En => &p.description_en,
        };
        out.push_str(&format!("{} ({})\n", p.heading_nl, p.name));
        out.push_str(&format!("  {}\n", description.trim()));
        out.push_str(&format!(
            "  {}: {}\n",
            t.data,
            self.describe_paths(p.paths).join(", ")
        ));
        out.push_str(&format!("  {}: {}\n", t.basis, p.legal_basis.words(lang)));
        let retention = match &p.retention {
            None => t.no_retention.to_owned(),
            Some(r) => {
                let until = match lang {
                    Lang::Nl => r.until_nl.as_deref(),
                    Lang::En => r.until_en.as_deref(),
                }
                .unwrap_or(&r.close_event);
                match (lang, r.keep_for.is_zero()) {
                    (Lang::Nl, true) => format!("tot {until}"),
                    (Lang::Nl, false) => {
                        format!("tot {until} en {} daarna", r.keep_for.words(lang))
                    }
                    (Lang::En, true) => format!("until {until}"),
                    (Lang::En, false) => {
                        format!("until {until} and {} after that", r.keep_for.words(lang))
                    }
                }
            }
        };
        out.push_str(&format!("  {}: {retention}\n", t.retention));
        if p.retention.as_ref().is_some_and(|r| !r.keep_for.is_zero())
            && !p.retention_readers.is_empty()
        {
            let readers: Vec<&str> = p.retention_readers.iter().map(|r| r.as_str()).collect();
            out.push_str(&format!("  {}: {}\n", t.readers, readers.join(", ")));
        }
        let objection = match (p.objection, p.legal_basis) {
            (Objection::OptOut, _) => t.opt_out,
            (Objection::ConsentBased, _) => t.consent,
            (Objection::NotObjectable, LegalBasis::LegalObligation) => t.not_obligation,
            (Objection::NotObjectable, LegalBasis::Contract) => t.not_contract,
            (Objection::NotObjectable, _) => t.not_other,
        };
        out.push_str(&format!("  {}: {objection}\n", t.objection));
        if !p.recipients.is_empty() {
            out.push_str(&format!(
                "  {}: {}\n",
                t.recipients,
                p.recipients.join(", ")
            ));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn explanation_names_every_purpose_and_the_authority() {
        let p = Policy::shipped().unwrap();
        for lang in [Lang::Nl, Lang::En] {
            let text = p.explain(lang);
            for purpose in p.purposes() {
                assert!(
                    text.contains(&purpose.heading_nl),
                    "{lang}: {}",
                    purpose.name
                );
            }
            assert!(text.contains("Autoriteit Persoonsgegevens"), "{lang}");
            assert!(
                text.contains("2019-08.1") && text.contains("2019-08-01"),
                "{lang}"
            );
            assert!(text.contains("Koningsweg 6A"), "{lang}");
        }
        let nl = p.explain(Lang::Nl);
        assert!(nl.contains("U kunt op ieder moment bezwaar maken"));
        assert!(nl.contains("wettelijke verplichting"));
        assert!(nl.contains("overeenkomst"));
        assert!(nl.contains("gerechtvaardigd belang"));
        assert!(nl.contains("tot uw bestelling is afgerond en 7 jaar daarna"));
        assert!(nl.contains("bezorgdienst"));
        let en = p.explain(Lang::En);
        assert!(en.contains("legal obligation") && en.contains("legitimate interest"));
        assert!(en.contains("and 7 years after that"));
    }

    #[test]
    fn languages_parse() {
        assert_eq!("nl".parse(), Ok(Lang::Nl));
        assert_eq!("en".parse(), Ok(Lang::En));
        assert_eq!("de".parse::<Lang>(), Err(UnknownLang));
    }
}
