//! What a connection may see: the accounts its token lists, or all of them.

use shared::claims::Claims;

/// Which accounts a connection may see, from its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Accounts(Vec<String>),
}

impl Scope {
    pub fn from_claims(claims: &Claims) -> Self {
        if claims.sees_all() {
            return Scope::All;
        }
        let mut accounts = claims.accounts.clone();
        accounts.sort();
        accounts.dedup();
        Scope::Accounts(accounts)
    }

    pub fn allows(&self, account_id: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Accounts(accounts) => accounts.iter().any(|a| a == account_id),
        }
    }

    /// The account, when the scope is exactly one (history reads can then filter).
    pub fn single_account(&self) -> Option<&str> {
        match self {
            Scope::Accounts(accounts) if accounts.len() == 1 => Some(&accounts[0]),
            _ => None,
        }
    }
}
