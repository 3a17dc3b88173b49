// Command promql-names parses PromQL expressions with Prometheus's own parser (github.com/prometheus/prometheus,
// the module version promtool is built from) and prints the metric names their vector selectors name.
//
// Input on stdin: a JSON array of expressions. Output on stdout: a JSON array, one object per expression, in order:
// {"expr": ..., "metrics": [sorted names], "error": ""}. A selector without a literal metric name (a regular
// expression on __name__, or none) is an error: its names cannot be checked. Exit status 0 unless the input cannot
// be read; parse errors are reported per expression.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

type result struct {
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics"`
	Error   string   `json:"error"`
}

func names(p parser.Parser, expr string) ([]string, error) {
	ast, err := p.ParseExpr(expr)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var walkErr error
	parser.Inspect(ast, func(node parser.Node, _ []parser.Node) error {
		vs, ok := node.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		if name == "" {
			for _, m := range vs.LabelMatchers {
				if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
					name = m.Value
				}
			}
		}
		if name == "" && walkErr == nil {
			walkErr = fmt.Errorf("selector %s names no metric literally", vs.String())
		}
		if name != "" {
			seen[name] = true
		}
		return nil
	})
	if walkErr != nil {
		return nil, walkErr
	}
	out := make([]string, 0, len(seen))
	for name := range seen {
		out = append(out, name)
	}
	sort.Strings(out)
	return out, nil
}

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "promql-names: reading stdin:", err)
		os.Exit(2)
	}
	var exprs []string
	if err := json.Unmarshal(data, &exprs); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names: stdin is not a JSON array of strings:", err)
		os.Exit(2)
	}
	// The options promtool and the Prometheus server use by default: no experimental functions.
	p := parser.NewParser(parser.Options{})
	results := make([]result, 0, len(exprs))
	for _, expr := range exprs {
		metrics, err := names(p, expr)
		r := result{Expr: expr, Metrics: metrics}
		if r.Metrics == nil {
			r.Metrics = []string{}
		}
		if err != nil {
			r.Error = err.Error()
		}
		results = append(results, r)
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "promql-names: writing stdout:", err)
		os.Exit(2)
	}
}
