//! A WHERE clause assembled from optional conditions, with its parameters bound in order:
//! the usage aggregates and the trace search filter the same way (tenant, time range).

use sqlx::any::{Any, AnyArguments};
use sqlx::query::Query;

enum Param {
    Text(String),
    Int(i64),
}

#[derive(Default)]
pub(crate) struct Filter {
    conditions: Vec<String>,
    params: Vec<Param>,
}

impl Filter {
    /// The rows of `tenant` (when given) whose `time_column` is in `[from, to)`.
    pub(crate) fn scope(
        tenant: Option<&str>,
        time_column: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Filter {
        let mut filter = Filter::default();
        if let Some(tenant) = tenant {
            filter.text("tenant_id = {}", tenant.to_string());
        }
        if let Some(from) = from {
            filter.int(&format!("{time_column} >= {{}}"), from);
        }
        if let Some(to) = to {
            filter.int(&format!("{time_column} < {{}}"), to);
        }
        filter
    }

    /// Adds a condition without a parameter.
    pub(crate) fn condition(&mut self, condition: &str) {
        self.conditions.push(condition.to_string());
    }

    /// Adds `condition`, whose `{}` is the new text parameter's placeholder.
    pub(crate) fn text(&mut self, condition: &str, value: String) {
        self.push(condition, Param::Text(value));
    }

    fn int(&mut self, condition: &str, value: i64) {
        self.push(condition, Param::Int(value));
    }

    fn push(&mut self, condition: &str, param: Param) {
        self.params.push(param);
        self.conditions.push(condition.replace("{}", &format!("${}", self.params.len())));
    }

    /// `WHERE ...`, or nothing when there is no condition.
    pub(crate) fn clause(&self) -> String {
        if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        }
    }

    /// Binds the parameters, in the order of their placeholders.
    pub(crate) fn bind<'q>(self, mut query: Query<'q, Any, AnyArguments>) -> Query<'q, Any, AnyArguments> {
        for param in self.params {
            query = match param {
                Param::Text(t) => query.bind(t),
                Param::Int(i) => query.bind(i),
            };
        }
        query
    }
}
