package bench

import (
	"fmt"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// chart draws two panels over the scenarios: throughput relative to direct, and proxy CPU per request, one bar
// per proxied path.
func (rep *Report) chart(file string) error {
	var scen []string
	for _, r := range rep.Rows {
		if len(scen) == 0 || scen[len(scen)-1] != r.Scenario {
			scen = append(scen, r.Scenario)
		}
	}
	title := "etcd-proxy-proxy benchmark"
	if rep.Smoke {
		title += " (SMOKE: not a measurement)"
	}
	if !rep.Valid {
		title += " — INVALID RUN: requests failed"
	}
	top, bottom := plot.New(), plot.New()
	top.Title.Text = title + "\nthroughput relative to direct access to the same member (same run)"
	top.Y.Label.Text = "× direct"
	bottom.Title.Text = "proxy CPU per request (utime+stime of the path's proxy processes)"
	bottom.Y.Label.Text = "µs / request"
	const barWidth = 10
	labels := map[string]string{
		pathStock: "stock proxy (v2: etcd --proxy=on; v3: etcd grpc-proxy)",
		pathOne:   "etcd-proxy-proxy",
		pathTwo:   "etcd-proxy-proxy x2 (chain)",
	}
	for i, p := range []string{pathStock, pathOne, pathTwo} {
		var rel, cpu plotter.Values
		for _, s := range scen {
			r := rep.row(s, p)
			if r == nil {
				rel, cpu = append(rel, 0), append(cpu, 0)
				continue
			}
			rel, cpu = append(rel, r.VsDirect), append(cpu, r.CPUusPerReq)
		}
		for _, panel := range []struct {
			p *plot.Plot
			v plotter.Values
		}{{top, rel}, {bottom, cpu}} {
			b, err := plotter.NewBarChart(panel.v, vg.Points(barWidth))
			if err != nil {
				return fmt.Errorf("chart: %w", err)
			}
			b.Offset = vg.Points(float64(i-1) * barWidth)
			b.Color = plotutil.Color(i)
			b.LineStyle.Width = 0
			panel.p.Add(b)
			if panel.p == top {
				panel.p.Legend.Add(labels[p], b)
			}
		}
	}
	one := plotter.NewFunction(func(float64) float64 { return 1 })
	one.Dashes = []vg.Length{vg.Points(4), vg.Points(4)}
	top.Add(one)
	top.Legend.Add("direct", one)
	top.Legend.Top = true
	top.Y.Min = 0
	top.Y.Max = 1.4 // room for the legend above the direct line
	for _, r := range rep.Rows {
		top.Y.Max = max(top.Y.Max, r.VsDirect*1.3)
	}
	bottom.Y.Min = 0
	for _, p := range []*plot.Plot{top, bottom} {
		p.NominalX(scen...)
		p.Add(plotter.NewGrid())
	}
	img := vgimg.New(14*vg.Inch, 9*vg.Inch)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}
	plots := [][]*plot.Plot{{top}, {bottom}}
	canvases := plot.Align(plots, tiles, dc)
	top.Draw(canvases[0][0])
	bottom.Draw(canvases[1][0])
	out, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(out); err != nil {
		out.Close()
		return fmt.Errorf("chart: %w", err)
	}
	return out.Close()
}
