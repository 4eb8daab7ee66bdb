//! Answer-quality metrics of generated answers against reference answers, as the
//! evaluation reports them (`training.eval_generate_samples`):
//!
//! - **Exact match**: the two strings are equal after whitespace normalisation (every
//!   run of Unicode whitespace becomes one space; leading and trailing whitespace is
//!   dropped). Case and punctuation count: `"Paris."` does not match `"paris"`, since an
//!   answer the model is trained to reproduce should be reproduced as written.
//! - **ROUGE-L F1** as Google's `rouge-score` package defines it: with `LCS` the length
//!   of the longest common subsequence of the candidate's and the reference's tokens,
//!   `P = LCS / len(candidate)`, `R = LCS / len(reference)`, `F = 2PR / (P + R)`; 0 when
//!   either side has no token (also when both are empty, as rouge-score scores them) or
//!   nothing is in common. Tokens ([`rouge_tokens`]): text is lowercased (as
//!   rouge-score's default tokenizer does) and split on whitespace and punctuation (which
//!   is dropped), and every CJK character (Han ideographs, Hiragana, Katakana, Hangul,
//!   Bopomofo, Yi) is a token of its own, so Chinese or Japanese text without spaces is
//!   compared character by character instead of as one "word".

/// `s` with every whitespace run collapsed to one space and the ends trimmed.
pub fn normalize_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Exact match after [`normalize_whitespace`] (case-sensitive).
pub fn exact_match(candidate: &str, reference: &str) -> bool {
    normalize_whitespace(candidate) == normalize_whitespace(reference)
}

/// Is `c` a character of a script written without spaces between words, scored one
/// character per token: CJK ideographs (all blocks and compatibility forms), Hiragana,
/// Katakana (with the phonetic extensions and halfwidth forms), Hangul (syllables and
/// jamo), Bopomofo and Yi.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x1100..=0x11FF     // Hangul Jamo
        | 0x2E80..=0x2FDF   // CJK Radicals Supplement, Kangxi Radicals
        | 0x3040..=0x309F   // Hiragana
        | 0x30A0..=0x30FF   // Katakana
        | 0x3100..=0x312F   // Bopomofo
        | 0x3130..=0x318F   // Hangul Compatibility Jamo
        | 0x31A0..=0x31BF   // Bopomofo Extended
        | 0x31F0..=0x31FF   // Katakana Phonetic Extensions
        | 0x3400..=0x4DBF   // CJK Unified Ideographs Extension A
        | 0x4E00..=0x9FFF   // CJK Unified Ideographs
        | 0xA000..=0xA4CF   // Yi Syllables and Radicals
        | 0xA960..=0xA97F   // Hangul Jamo Extended-A
        | 0xAC00..=0xD7AF   // Hangul Syllables
        | 0xD7B0..=0xD7FF   // Hangul Jamo Extended-B
        | 0xF900..=0xFAFF   // CJK Compatibility Ideographs
        | 0xFF66..=0xFF9F   // Halfwidth Katakana
        | 0xFFA0..=0xFFDC   // Halfwidth Hangul
        | 0x1B000..=0x1B16F // Kana Supplement, Extended-A, Small Kana Extension
        | 0x20000..=0x2FA1F // CJK Unified Ideographs Extensions B-F, Compatibility Supplement
        | 0x30000..=0x323AF // CJK Unified Ideographs Extensions G, H
    )
}

/// The tokens ROUGE-L compares (module docs): lowercased alphanumeric runs, and each CJK
/// character alone; whitespace and punctuation separate tokens and are dropped.
pub fn rouge_tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in s.chars() {
        if is_cjk(c) {
            if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            word.extend(c.to_lowercase());
        } else if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// Length of the longest common subsequence of `a` and `b` (O(|a| |b|) time, O(|b|)
/// memory).
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L precision, recall and F1 of `candidate` against `reference` (module docs).
pub fn rouge_l(candidate: &str, reference: &str) -> RougeScore {
    let (c, r) = (rouge_tokens(candidate), rouge_tokens(reference));
    if c.is_empty() || r.is_empty() {
        return RougeScore::default();
    }
    let lcs = lcs_len(&c, &r) as f64;
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    let f = if p + rec > 0.0 { 2.0 * p * rec / (p + rec) } else { 0.0 };
    RougeScore { precision: p, recall: rec, f1: f }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeScore {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// The mean exact match (a fraction in [0, 1]) and mean ROUGE-L F1 of
/// `(candidate, reference)` pairs; `None` for no pairs.
pub fn score_answers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<AnswerScores> {
    let (mut n, mut em, mut rl) = (0usize, 0usize, 0f64);
    for (c, r) in pairs {
        n += 1;
        em += usize::from(exact_match(c, r));
        rl += rouge_l(c, r).f1;
    }
    (n > 0).then(|| AnswerScores { exact_match: em as f64 / n as f64, rouge_l: rl / n as f64, count: n })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerScores {
    pub exact_match: f64,
    pub rouge_l: f64,
    /// Pairs scored.
    pub count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn exact_match_normalises_whitespace_only() {
        assert!(exact_match("  Click  the\n[Sign up]\tbutton ", "Click the [Sign up] button"));
        assert!(exact_match("", "   "));
        assert!(!exact_match("Paris.", "Paris"));
        assert!(!exact_match("paris", "Paris"), "case-sensitive");
        assert!(exact_match("我们 支持\u{3000}支付宝", "我们 支持 支付宝"), "ideographic space is whitespace");
        assert!(!exact_match("我们支持支付宝", "我们 支持 支付宝"));
    }

    #[test]
    fn tokens_split_words_punctuation_and_cjk() {
        assert_eq!(rouge_tokens("Click the [Sign-up] button, NOW!"), ["click", "the", "sign", "up", "button", "now"]);
        assert_eq!(rouge_tokens("我们支持支付宝。"), ["我", "们", "支", "持", "支", "付", "宝"]);
        assert_eq!(rouge_tokens("点击[注册]按钮"), ["点", "击", "注", "册", "按", "钮"]);
        assert_eq!(rouge_tokens("GPU版本は2つ"), ["gpu", "版", "本", "は", "2", "つ"]);
        assert_eq!(rouge_tokens("안녕하세요 world"), ["안", "녕", "하", "세", "요", "world"]);
        assert_eq!(rouge_tokens("  ,.!  "), Vec::<String>::new());
        assert_eq!(rouge_tokens("café 3.14"), ["café", "3", "14"]);
    }

    #[test]
    fn lcs_known_values() {
        assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
        assert_eq!(lcs_len(b"ABCBDAB", b"BDCABA"), 4);
        assert_eq!(lcs_len::<u8>(&[], b"abc"), 0);
    }

    #[test]
    fn rouge_l_known_values() {
        // rouge-score: RougeScorer(["rougeL"]).score("the cat sat on the mat",
        // "the cat was on the mat"): LCS 5 (the cat on the mat) of 6 and 6.
        let s = rouge_l("the cat was on the mat", "the cat sat on the mat");
        assert!(close(s.precision, 5.0 / 6.0) && close(s.recall, 5.0 / 6.0) && close(s.f1, 5.0 / 6.0), "{s:?}");
        // Different lengths: candidate "police killed the gunman" vs reference "the
        // gunman was shot dead by police": LCS 2 ("the gunman"); P 2/4, R 2/7, F 4/11.
        let s = rouge_l("police killed the gunman", "the gunman was shot dead by police");
        assert!(close(s.precision, 0.5) && close(s.recall, 2.0 / 7.0) && close(s.f1, 4.0 / 11.0), "{s:?}");
        // rouge-score's README: score(target "The quick brown fox jumps over the lazy dog",
        // prediction "The quick brown dog jumps on the log.") gives rougeL precision 0.625,
        // recall 0.5556, fmeasure 0.5882 (LCS 5 of 8 and 9 tokens).
        let s = rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog");
        assert!(close(s.precision, 0.625) && close(s.recall, 5.0 / 9.0), "{s:?}");
        assert_eq!(format!("{:.4}", s.f1), "0.5882");
        // Identical up to case and punctuation: 1.
        assert!(close(rouge_l("Click the [Sign up] button.", "click the sign up button").f1, 1.0));
        // Nothing in common: 0.
        assert_eq!(rouge_l("yes", "no").f1, 0.0);
    }

    #[test]
    fn rouge_l_cjk_counts_characters() {
        // Reference 我们支持支付宝和银行卡 (11 characters), candidate 我们支持银行卡 (7):
        // LCS 7, P 1, R 7/11, F 2 * 7/11 / (1 + 7/11) = 14/18.
        let s = rouge_l("我们支持银行卡", "我们支持支付宝和银行卡");
        assert!(close(s.precision, 1.0) && close(s.recall, 7.0 / 11.0) && close(s.f1, 14.0 / 18.0), "{s:?}");
        // Whitespace-split "words" would see one token each and score 0.
        assert!(s.f1 > 0.7);
        // Mixed scripts: [创, 建, account] vs [创, 建, an, account]: LCS 3, P 1, R 3/4.
        let s = rouge_l("创建account", "创建 an account");
        assert!(close(s.f1, 2.0 * 0.75 / 1.75), "{s:?}");
    }

    #[test]
    fn empty_strings_score_zero() {
        assert_eq!(rouge_l("", "the answer"), RougeScore::default());
        assert_eq!(rouge_l("the answer", ""), RougeScore::default());
        assert_eq!(rouge_l("", ""), RougeScore::default(), "as rouge-score: no tokens, no score");
        assert_eq!(rouge_l("...", "!!"), RougeScore::default());
        // exact match of two empty answers is a match
        assert!(exact_match("", ""));
    }

    #[test]
    fn averages() {
        assert_eq!(score_answers(std::iter::empty()), None);
        let s = score_answers([("the cat", "the cat"), ("a dog", "the cat"), ("我们", "我们支持")]).unwrap();
        assert_eq!(s.count, 3);
        assert!(close(s.exact_match, 1.0 / 3.0));
        // 1, 0 and F(P 1, R 1/2) = 2/3
        assert!(close(s.rouge_l, (1.0 + 0.0 + 2.0 / 3.0) / 3.0), "{s:?}");
    }
}
