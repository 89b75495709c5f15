//! The hidden truth the devices hold: the true quality of every model on every request, as the
//! simulator has it. It turns a final reply (expert, SLO met) into realised QoS.

use std::collections::HashMap;
use std::sync::Arc;

use qosroute_sim::QualityTable;

/// The true quality of each expert's answers: a quality table row per request (the workload's
/// `quality_row`) and the table's model column of each expert.
#[derive(Debug, Clone)]
pub struct QualityTruth {
    table: Arc<QualityTable>,
    columns: HashMap<String, usize>,
}

impl QualityTruth {
    /// The truth of `table` for experts given as `(expert name, model column)`; experts whose
    /// model has no column have no known quality.
    pub fn new<N, M>(table: Arc<QualityTable>, experts: impl IntoIterator<Item = (N, M)>) -> Self
    where
        N: Into<String>,
        M: AsRef<str>,
    {
        let columns = experts
            .into_iter()
            .filter_map(|(name, model)| Some((name.into(), table.model_index(model.as_ref())?)))
            .collect();
        Self { table, columns }
    }

    /// Experts whose quality is known.
    pub fn experts(&self) -> impl Iterator<Item = &str> {
        self.columns.keys().map(String::as_str)
    }

    /// The quality (0..1) of `expert`'s answer to the request of `quality_row`.
    pub fn quality(&self, quality_row: u32, expert: &str) -> Option<f32> {
        let column = *self.columns.get(expert)?;
        let row = self.table.rows.get(usize::try_from(quality_row).ok()?)?;
        row.quality.get(column).copied().filter(|q| q.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_comes_from_the_row_and_the_model_column() {
        let table = Arc::new(QualityTable::embedded().unwrap());
        let model = table.models[0].clone();
        let truth = QualityTruth::new(
            table.clone(),
            [("a", model.as_str()), ("b", "no-such-model")],
        );
        assert_eq!(truth.quality(3, "a"), Some(table.rows[3].quality[0]));
        assert_eq!(truth.quality(3, "b"), None);
        assert_eq!(truth.quality(3, "c"), None);
        assert_eq!(truth.quality(u32::MAX, "a"), None);
        assert_eq!(truth.experts().collect::<Vec<_>>(), vec!["a"]);
    }
}
