//! The selector parser: a hand-written recursive descent over characters, with errors that give the position
//! (0-based character offset) and what was expected there.

use std::collections::BTreeSet;
use std::fmt;

use super::Expr;

/// Why a selector did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The selector text.
    pub selector: String,
    /// 0-based character offset of the problem.
    pub position: usize,
    /// What would have been valid there.
    pub expected: String,
    /// What was found there (`end of selector` at the end).
    pub found: String,
}

impl ParseError {
    pub(crate) fn new(selector: &str, position: usize, expected: &str) -> Self {
        let found = match selector.chars().nth(position) {
            None => "end of selector".to_owned(),
            Some(_) => {
                let rest: String = selector.chars().skip(position).take(12).collect();
                format!("{rest:?}")
            }
        };
        ParseError {
            selector: selector.to_owned(),
            position,
            expected: expected.to_owned(),
            found,
        }
    }

    /// The selector with a caret under the error, for terminals.
    pub fn caret(&self) -> String {
        format!("{}\n{}^", self.selector, " ".repeat(self.position))
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "selector {:?}: at character {}: expected {}, found {}",
            self.selector,
            self.position + 1,
            self.expected,
            self.found
        )
    }
}

impl std::error::Error for ParseError {}

/// Parses selector text into an expression. The empty (or all-blank) selector is `all()`.
pub fn parse(text: &str) -> Result<Expr, ParseError> {
    let mut p = Parser {
        text,
        chars: text.chars().collect(),
        pos: 0,
    };
    p.skip_ws();
    if p.at_end() {
        return Ok(Expr::All);
    }
    let expr = p.or()?;
    p.skip_ws();
    if !p.at_end() {
        return Err(p.error("&&, || or the end of the selector"));
    }
    Ok(expr)
}

struct Parser<'a> {
    text: &'a str,
    chars: Vec<char>,
    pos: usize,
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

impl Parser<'_> {
    fn error(&self, expected: &str) -> ParseError {
        ParseError::new(self.text, self.pos, expected)
    }

    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consumes `token` (after blanks) if it is next.
    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        let n = token.chars().count();
        if self.chars.len() >= self.pos + n
            && self.chars[self.pos..self.pos + n]
                .iter()
                .copied()
                .eq(token.chars())
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    /// Consumes the word `word` if it is next and not the start of a longer key.
    fn eat_word(&mut self, word: &str) -> bool {
        let start = self.pos;
        if self.eat(word) && !self.peek().is_some_and(is_key_char) {
            return true;
        }
        self.pos = start;
        false
    }

    fn expect(&mut self, token: &str, expected: &str) -> Result<(), ParseError> {
        if self.eat(token) {
            Ok(())
        } else {
            self.skip_ws();
            Err(self.error(expected))
        }
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.and()?];
        while self.eat("||") {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.unary()?];
        while self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        self.skip_ws();
        if self.eat("!") {
            if self.peek() == Some('=') {
                self.pos -= 1;
                return Err(self.error("a label key before !="));
            }
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")", "&&, || or )")?;
            return Ok(inner);
        }
        let start = self.pos;
        let key = self.key()?;
        // `all()`, `global()` and `has(k)` are functions only when a parenthesis follows.
        let save = self.pos;
        if self.eat("(") {
            match key.as_str() {
                "all" | "global" => {
                    self.expect(")", ") (all() and global() take no argument)")?;
                    return Ok(if key == "all" { Expr::All } else { Expr::Global });
                }
                "has" => {
                    self.skip_ws();
                    let k = self.key()?;
                    self.expect(")", ") after the label key")?;
                    return Ok(Expr::Has(k));
                }
                _ => {
                    self.pos = start;
                    return Err(
                        self.error("all(), global(), has(key) or a label key followed by an operator")
                    );
                }
            }
        }
        self.pos = save;
        self.operator(key)
    }

    fn operator(&mut self, key: String) -> Result<Expr, ParseError> {
        if self.eat("==") {
            return Ok(Expr::Eq(key, self.value()?));
        }
        if self.eat("!=") {
            return Ok(Expr::Ne(key, self.value()?));
        }
        if self.eat_word("in") {
            return Ok(Expr::In(key, self.set()?));
        }
        if self.eat_word("not") {
            if !self.eat_word("in") {
                self.skip_ws();
                return Err(self.error("in (as in `key not in {...}`)"));
            }
            return Ok(Expr::NotIn(key, self.set()?));
        }
        if self.eat_word("contains") {
            return Ok(Expr::Contains(key, self.value()?));
        }
        if self.eat_word("starts") {
            self.expect_with()?;
            return Ok(Expr::StartsWith(key, self.value()?));
        }
        if self.eat_word("ends") {
            self.expect_with()?;
            return Ok(Expr::EndsWith(key, self.value()?));
        }
        self.skip_ws();
        Err(self.error("an operator: ==, !=, in, not in, contains, starts with or ends with"))
    }

    fn expect_with(&mut self) -> Result<(), ParseError> {
        if self.eat_word("with") {
            Ok(())
        } else {
            self.skip_ws();
            Err(self.error("with"))
        }
    }

    fn key(&mut self) -> Result<String, ParseError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(is_key_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("a label key, !, (, all(), global() or has(key)"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn value(&mut self) -> Result<String, ParseError> {
        self.skip_ws();
        let Some(quote @ ('"' | '\'')) = self.peek() else {
            return Err(self.error("a value in quotes"));
        };
        let start = self.pos;
        self.pos += 1;
        let body = self.pos;
        while let Some(c) = self.peek() {
            if c == quote {
                let v = self.chars[body..self.pos].iter().collect();
                self.pos += 1;
                return Ok(v);
            }
            self.pos += 1;
        }
        self.pos = start;
        Err(self.error("a closing quote for this value"))
    }

    fn set(&mut self) -> Result<BTreeSet<String>, ParseError> {
        self.expect("{", "{ to start a set of values")?;
        let mut values = BTreeSet::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.insert(self.value()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",", ", or }")?;
        }
    }
}
