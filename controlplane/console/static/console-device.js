// The device page's telemetry charts: fetches #charts[data-src] (telemetry.json) and draws them with uPlot.
// No inline script (strict CSP); labels from the device are set as text, never as markup.
(function () {
  "use strict";

  var CHARTS = [
    {title: "CPU", unit: "%", series: [["cpu_percent", "CPU %", "#1f6feb"]]},
    {title: "Memory used", unit: "MB", series: [["mem_used_mb", "used MB", "#8250df"]]},
    {title: "Temperature", unit: "°C", series: [["temperature_c", "°C", "#cf222e"]]},
    {title: "Battery", unit: "%", series: [["battery_percent", "battery %", "#1a7f37"]]},
    {title: "Inference latency", unit: "ms",
     series: [["latency_p50_ms", "p50 ms", "#0969da"], ["latency_p95_ms", "p95 ms", "#bf8700"]]},
    {title: "Prediction confidence", unit: "", series: [["mean_confidence", "mean confidence", "#6639ba"]]}
  ];

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function hasValues(column) {
    for (var i = 0; i < column.length; i++) if (column[i] !== null) return true;
    return false;
  }

  function drawChart(root, chart, data, plots) {
    var box = element("div", "chart");
    box.setAttribute("data-chart", chart.series[0][0]);
    box.appendChild(element("h3", null, chart.title + (chart.unit ? " (" + chart.unit + ")" : "")));
    root.appendChild(box);
    var columns = [data.ts];
    var series = [{}];
    var any = false;
    chart.series.forEach(function (s) {
      var column = data[s[0]] || [];
      any = any || hasValues(column);
      columns.push(column);
      series.push({label: s[1], stroke: s[2], width: 1.5, spanGaps: false});
    });
    if (!any) {
      box.appendChild(element("p", "muted", "not reported in this window"));
      return;
    }
    var width = Math.max(260, box.clientWidth - 16);
    var plot = new uPlot({width: width, height: 180, series: series, axes: [{}, {size: 50}],
                          scales: {x: {time: true}}, legend: {live: true}}, columns, box);
    plots.push([plot, box]);
  }

  function drawHistogram(root, histogram, data) {
    var box = element("div", "chart");
    box.setAttribute("data-chart", "class_histogram");
    var title = "Predicted classes";
    if (data.every > 1) title += " (1 of every " + data.every + " records)";
    box.appendChild(element("h3", null, title));
    root.appendChild(box);
    if (!histogram.length) {
      box.appendChild(element("p", "muted", "no predictions in this window"));
      return;
    }
    var max = histogram[0].count || 1;
    var grid = element("div", "hist");
    histogram.forEach(function (entry) {
      var label = element("span", "label", entry.label);
      label.title = entry.label;
      var bar = element("div", "bar");
      bar.style.width = Math.max(0.5, 100 * entry.count / max) + "%";
      grid.appendChild(label);
      grid.appendChild(bar);
      grid.appendChild(element("span", "num", String(entry.count)));
    });
    box.appendChild(grid);
  }

  function render(root, data) {
    root.textContent = "";
    root.setAttribute("data-records", String(data.records));
    if (!data.ts.length) {
      root.appendChild(element("p", "muted", "No telemetry in this window."));
      root.setAttribute("data-ready", "1");
      return;
    }
    var plots = [];
    CHARTS.forEach(function (chart) { drawChart(root, chart, data, plots); });
    drawHistogram(root, data.class_histogram || [], data);
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () {
        plots.forEach(function (p) { p[0].setSize({width: Math.max(260, p[1].clientWidth - 16), height: 180}); });
      }, 150);
    });
    root.setAttribute("data-ready", "1");
  }

  function load() {
    var root = document.getElementById("charts");
    if (!root || !root.getAttribute("data-src")) return;
    fetch(root.getAttribute("data-src"), {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (data) { render(root, data); })
      .catch(function (error) {
        root.textContent = "";
        root.appendChild(element("p", "error", "Telemetry could not be loaded: " + error.message));
        root.setAttribute("data-ready", "error");
      });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", load);
  else load();
})();
