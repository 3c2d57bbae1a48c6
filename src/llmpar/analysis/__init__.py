"""Study analysis: aggregation to tables, figures, the HTML report."""
