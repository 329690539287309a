# Training curves of the digits demo (demo_curves.dat: one block per run, as written by
# digits_finetune). Run from the folder holding it:  gnuplot examples/digits/plot_curves.gp
# Writes demo_curves.svg: downstream test accuracy per epoch, and the training loss.
set terminal svg size 1000,450 dynamic
set output "demo_curves.svg"
set multiplot layout 1,2
stats "demo_curves.dat" using 1 nooutput
runs = STATS_blocks
set xlabel "epoch"
set key bottom right
set ylabel "downstream test accuracy (%)"
set yrange [0:100]
# Block 0 is the upstream base model; the first comment line of each block names the run.
name(i) = system(sprintf("awk 'BEGIN{RS=\"\\n\\n\\n\"} NR==%d{sub(/^# /,\"\"); split($0,a,\"\\n\"); print a[1]}' demo_curves.dat", i + 1))
plot for [i=1:runs-1] "demo_curves.dat" index i using 1:4 with lines lc i + 1 title name(i)
set ylabel "training loss"
set yrange [*:*]
set logscale y
set key top right
plot for [i=0:runs-1] "demo_curves.dat" index i using 1:2 with lines lc i + 1 title name(i)
unset multiplot
