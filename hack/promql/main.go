// promql-check reads PromQL expressions (a JSON array) on stdin and prints, one JSON object per line,
// whether Prometheus's own parser accepts each and which metric names it selects. Built from the Go
// module proxy by hack/build-checker.sh; used by tests/cluster/test_metrics.py on the Grafana dashboard.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	var exprs []string
	if err := json.NewDecoder(os.Stdin).Decode(&exprs); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, e := range exprs {
		answer := map[string]any{"expr": e}
		parsed, err := parser.ParseExpr(e)
		if err != nil {
			answer["error"] = err.Error()
		} else {
			var names []string
			for _, s := range parser.ExtractSelectors(parsed) {
				for _, m := range s {
					if m.Name == "__name__" {
						names = append(names, m.Value)
					}
				}
			}
			answer["metrics"] = names
		}
		_ = out.Encode(answer)
	}
}
